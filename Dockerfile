# One image, two processes:
#   API (default):  docker run -p 8000:8000 IMAGE
#   worker:         docker run --no-healthcheck IMAGE python worker.py
# (The HEALTHCHECK below probes the API's port. The worker serves its own health endpoint when
# WORKER_HEALTH_PORT is set (worker_health.py): turn the image's check off for it with
# `--no-healthcheck`, or give it its own, as docker-compose.yml does. Kubernetes ignores
# HEALTHCHECK and uses the probes in deploy/.)
#
# Built with BuildKit (Docker's default builder since 23.0): RUN --mount and COPY --chmod.
# Both stages must use the same Python image: the virtualenv is copied across and its
# interpreter links to /usr/local/bin/python3.11.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: resolve and install the runtime dependencies into /app/.venv --------------
FROM ${PYTHON_IMAGE} AS builder

ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"

# Compile bytecode now (the runtime file system may be read-only), copy instead of hard-link
# (the cache is a mount), and never download a Python: use the image's.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app
# Only pyproject.toml: every dependency, transitive ones included, is pinned there
# ([tool.uv] constraint-dependencies, written by scripts/pin-dependencies.sh) and uv sync
# resolves within those pins; no lock file is kept in the repository.
# The project is `package = false`, so nothing of the source is needed to install.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --no-dev

# ---- runtime -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed, non-root uid/gid, so Kubernetes' runAsNonRoot/runAsUser can check it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin app

WORKDIR /app
COPY --from=builder /app/.venv /app/.venv
# The source needed at run time, owned by root: the app cannot change its own code.
COPY api/ api/
COPY activities/ activities/
COPY workflows/ workflows/
COPY domain.py settings.py connection.py audit.py telemetry.py worker.py worker_health.py \
    config.yaml ./
COPY --chmod=755 docker/entrypoint.sh docker/entrypoint.sh
RUN python -m compileall -q api activities workflows domain.py settings.py connection.py audit.py \
    worker.py worker_health.py

# Company CA certificates (*.crt, *.pem) mounted at /certs are trusted at start: see
# docker/entrypoint.sh. (No VOLUME: it would leave an anonymous volume behind on every run.)

USER 10001:10001
EXPOSE 8000

# Liveness of the API; slim has no curl, so Python's urllib does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
