#!/bin/sh
# Container entrypoint for the API and the worker (same image): trust the company's CA
# certificates, then run the command (`uvicorn ...` by default, or `python worker.py`).
#
# Mount CA certificates as `*.crt` or `*.pem` files (PEM) into ${CERTS_DIR:-/certs}: in
# Kubernetes a ConfigMap volume, in Compose a bind mount. No root is needed: instead of
# running update-ca-certificates, the system bundle and the mounted certificates are
# concatenated into a writable file (default /tmp/ca-bundle.pem) and these point at it:
#   SSL_CERT_FILE       OpenSSL's default trust store, so Python's ssl module and with it
#                       connection.tls_context(): LiteLLM (httpx) and SMTP (aiosmtplib).
#   REQUESTS_CA_BUNDLE  for anything built on requests.
# Temporal's client is not covered by this: it trusts the system roots, or the CA given in
# TEMPORAL_TLS_CA_FILE (e.g. TEMPORAL_TLS_CA_FILE=/certs/company-ca.crt).
#
# Knobs (defaults suit the image): CERTS_DIR, SYSTEM_CA_BUNDLE, CA_BUNDLE_OUT.
set -eu

certs_dir="${CERTS_DIR:-/certs}"
system_bundle="${SYSTEM_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
bundle="${CA_BUNDLE_OUT:-/tmp/ca-bundle.pem}"

log() {
    # stderr, so a command's own output on stdout stays clean
    echo "entrypoint: $*" >&2
}

added=0
if [ -d "$certs_dir" ]; then
    for cert in "$certs_dir"/*.crt "$certs_dir"/*.pem; do
        # An unmatched glob stays literal; ConfigMap volumes hold symlinks, so test -f follows.
        [ -f "$cert" ] || continue
        if ! grep -q -e '-----BEGIN CERTIFICATE-----' "$cert"; then
            log "skipping $cert: no PEM certificate in it (DER? convert: openssl x509 -inform der -in FILE -out FILE.crt)"
            continue
        fi
        if [ "$added" -eq 0 ]; then
            # Start from the system roots so that public CAs stay trusted.
            if ! : >"$bundle.tmp" 2>/dev/null; then
                log "cannot write $bundle: mount a writable /tmp (e.g. an emptyDir) or set CA_BUNDLE_OUT"
                exit 1
            fi
            if [ -r "$system_bundle" ]; then
                cat "$system_bundle" >>"$bundle.tmp"
            else
                log "warning: no system CA bundle at $system_bundle; trusting only the mounted certificates"
            fi
        fi
        # Only the certificate blocks: a private key in a mounted .pem never lands in the bundle,
        # and a file without a trailing newline cannot glue two PEM blocks together.
        printf '\n' >>"$bundle.tmp"
        sed -n '/-----BEGIN CERTIFICATE-----/,/-----END CERTIFICATE-----/p' "$cert" >>"$bundle.tmp"
        count=$(grep -c -e '-----BEGIN CERTIFICATE-----' "$cert")
        log "trusting $cert ($count certificate(s))"
        added=$((added + 1))
    done
fi

if [ "$added" -gt 0 ]; then
    mv "$bundle.tmp" "$bundle"
    export SSL_CERT_FILE="$bundle"
    export REQUESTS_CA_BUNDLE="$bundle"
    case "$(echo "${TEMPORAL_TLS:-false}" | tr '[:upper:]' '[:lower:]')" in
        1 | true | yes | on)
            if [ -z "${TEMPORAL_TLS_CA_FILE:-}" ]; then
                log "note: the Temporal connection trusts the system roots; if Temporal's certificate is signed by one of these CAs, set TEMPORAL_TLS_CA_FILE to its file"
            fi
            ;;
    esac
fi

exec "$@"
