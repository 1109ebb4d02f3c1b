"""Two benchmark runs side by side, as a Markdown table (the BENCHMARKS.md before-and-after).

uv run python -m bench.compare bench/results-before.json bench/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.run import TARGETS, meets


def figures(results: dict) -> dict[str, tuple[str, float | None]]:
    """Label -> (shown text, value for the target check) for one run."""
    out: dict[str, tuple[str, float | None]] = {}
    for key, r in results.get("ratios", {}).items():
        unit = r["unit"]
        shown = f"{r['value']:.2f} ({r['ours']:.1f} / {r['yardstick']:.1f} {unit})"
        out[key] = (shown, r["value"])
    memory = results.get("memory", {})
    for key, name in (("worker_peak_rss_mb", "worker"), ("api_peak_rss_mb", "api")):
        value = memory.get(f"{name}_after_burst_mb") or memory.get(f"{name}_at_end_mb")
        if value is not None:
            out[key] = (f"{value:.0f} MB", value)
    if lat := results.get("latency"):
        out["latency_p50_s"] = (f"{lat['e2e_s']['p50'] * 1000:.0f} ms", lat["e2e_s"]["p50"])
    for rec in results.get("reconcile", []):
        n = rec["pending_secrets"]
        out[f"reconcile_{n}"] = (f"{rec['elapsed_s']:.2f} s", None)
    if burst := results.get("burst"):
        out["burst_lost"] = (f"{burst['lost']} lost, {burst['duplicate_emails']} duplicates", None)
        others = burst["cpu_s"].get("others", 0.0)
        out["burst_others"] = (f"{others:.1f} s in {burst['drain_s']:.0f} s", None)
    return out


LABELS = {
    "burst_throughput_ratio": "burst throughput, ours / bare",
    "temporal_cpu_ratio": "Temporal CPU per request / per bare workflow",
    "worker_cpu_ratio": "worker CPU per request / bare worker per workflow",
    "latency_p50_ratio": "latency p50, ours / bare sequential",
    "reconcile_scaling_ratio": "reconcile time 10,000 / 1,000",
    "worker_peak_rss_mb": "worker peak RSS after the burst",
    "api_peak_rss_mb": "API peak RSS after the burst",
    "latency_p50_s": "latency p50",
    "reconcile_1000": "reconcile 1,000 pending Secrets",
    "reconcile_10000": "reconcile 10,000 pending Secrets",
    "burst_lost": "burst: lost / duplicate emails",
    "burst_others": "burst: CPU of other work on the machine",
}


def table(before: dict, after: dict) -> str:
    b, a = figures(before), figures(after)
    rows = [
        "| Figure | Before | After | Target |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in LABELS.items():
        if key not in b and key not in a:
            continue
        target = ""
        if key in TARGETS:
            op, limit = TARGETS[key]
            value = a.get(key, ("", None))[1]
            met = "met" if value is not None and meets(key, value) else "missed"
            target = f"{op} {limit:g}: {met}"
        rows.append(f"| {label} | {b.get(key, ('-',))[0]} | {a.get(key, ('-',))[0]} | {target} |")
    loads = [r["machine"].get("loadavg_at_start", "?") for r in (before, after)]
    rows.append(f"| load average (1/5/15 min) at start | {' '.join(loads[0])} | "
                f"{' '.join(loads[1])} | |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = (json.loads(Path(p).read_text()) for p in args)
    print(table(before, after))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
