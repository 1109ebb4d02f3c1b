"""What telemetry costs: metrics and tracing, each on and off, measured in one run.

    uv run python -m bench.telemetry_cost                 # 100 requests per variant
    uv run python -m bench.telemetry_cost --requests 20 --rounds 1

One Temporal dev server, one pair of stand-ins and one SMTP sink; for each variant a fresh
worker and API (as deployed: `worker.py` and uvicorn's factory, configured by the environment)
on a task queue of their own, then auto-approved requests sent one after another. Per variant:
the latency p50 (POST to the email accepted) and the CPU seconds per request of the API and
the worker together. The variants run in rounds, each round in the opposite order of the last,
so that drift in a shared machine's load falls on all of them alike.

- off: no METRICS_PORT, no OTEL_EXPORTER_OTLP_ENDPOINT (the default);
- metrics: METRICS_PORT on both, each endpoint scraped once at the end of the variant;
- tracing: OTLP/HTTP to a collector stub in this process that accepts and drops the spans;
- both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request, Response

from bench.run import percentile
from bench.stack import (
    MAX_CHILD_SECONDS,
    BenchTemporalServer,
    TimedMailSink,
    cpu_seconds,
    python_env,
    read_json_line,
    service_env,
    spawn,
    wait_for_http,
    wait_for_log,
)
from devstack.http import free_port, serve_in_thread

AUTO_APPROVED_MODEL = "gpt-4o-mini"  # config.yaml: example.com + gpt-4o-mini -> approve
VARIANTS = ("off", "metrics", "tracing", "both")
LIMIT = 0.10  # the issue's budget: neither may cost more than 10 %


def collector():
    """An OTLP/HTTP endpoint that accepts span exports and keeps only their count."""
    exports: list[int] = []
    app = FastAPI()

    @app.post("/v1/traces")
    async def traces(request: Request) -> Response:
        exports.append(len(await request.body()))
        return Response(status_code=200)

    return serve_in_thread(app), exports


async def one_variant(
    name: str, base_env: dict, state: Path, otlp: str, sink: TimedMailSink, n: int, tag: str
) -> dict:
    ports = {"worker": free_port(), "api": free_port()}
    metrics = name in ("metrics", "both")
    env = {k: v for k, v in base_env.items() if k != "METRICS_PORT" and not k.startswith("OTEL_")}
    env["TEMPORAL_TASK_QUEUE"] = f"bench-telemetry-{tag}"
    if name in ("tracing", "both"):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
    py = sys.executable
    worker_env = {**env, **({"METRICS_PORT": str(ports["worker"])} if metrics else {})}
    api_env = {**env, **({"METRICS_PORT": str(ports["api"])} if metrics else {})}
    worker = spawn(f"worker-{tag}", [py, "worker.py"], state / f"worker-{tag}.log", worker_env)
    api_port = free_port()
    api = spawn(
        f"api-{tag}",
        [py, "-m", "uvicorn", "api.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"],
        state / f"api-{tag}.log", api_env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{api_port}"
    try:
        wait_for_log(worker, "worker ready", 90)
        wait_for_http(api, f"{url}/health/ready", 90)
        latencies: list[float] = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            # Five untimed requests first: imports, connections and caches warm up.
            for i in range(-5, n):
                if i == 0:
                    cpu_before = cpu_seconds(api.pid) + cpu_seconds(worker.pid)
                email = f"tel-{tag}-{i + 5}@example.com"
                sent = time.monotonic()
                answer = await http.post(
                    "/api/request-key", json={"email": email, "llm": AUTO_APPROVED_MODEL}
                )
                answer.raise_for_status()
                arrived = await asyncio.to_thread(sink.arrival, email, 30)
                if arrived is None:
                    raise RuntimeError(f"{name}: no email to {email} within 30 s")
                if i >= 0:
                    latencies.append(arrived - sent)
            if metrics:  # what one Prometheus scrape costs, once per variant
                for process in ("api", "worker"):
                    await http.get(f"http://127.0.0.1:{ports[process]}/metrics")
        cpu = cpu_seconds(api.pid) + cpu_seconds(worker.pid) - cpu_before
        return {"latencies": latencies, "cpu_s": cpu, "requests": n}
    finally:
        api.stop()
        worker.stop()


async def run(args: argparse.Namespace) -> dict:
    state = Path(args.state_dir)
    temporal = BenchTemporalServer(
        db_file=state / "temporal.db", log_file=state / "temporal.log"
    ).start()
    sink = TimedMailSink().start()
    standins = spawn(
        "stand-ins",
        [sys.executable, "-m", "bench.standins", "--state-dir", str(state),
         "--max-seconds", str(MAX_CHILD_SECONDS)],
        state / "standins.log", python_env(state / "pycache"), stdout_pipe=True,
    )  # fmt: skip
    otlp, exports = collector()
    try:
        ports = read_json_line(standins, 60)
        env = service_env(python_env(state / "pycache"), temporal.address, ports, sink)
        per_round = max(1, args.requests // args.rounds)
        gathered = {v: {"latencies": [], "cpu_s": 0.0, "requests": 0} for v in VARIANTS}
        for round_ in range(args.rounds):
            order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
            for variant in order:
                tag = f"{variant}-{round_}"
                print(f"round {round_ + 1}/{args.rounds}: {variant}", flush=True)
                got = await one_variant(variant, env, state, otlp.url, sink, per_round, tag)
                gathered[variant]["latencies"] += got["latencies"]
                gathered[variant]["cpu_s"] += got["cpu_s"]
                gathered[variant]["requests"] += got["requests"]
    finally:
        otlp.stop()
        standins.stop()
        sink.stop()
        temporal.stop()
    results = {
        v: {
            "requests": g["requests"],
            "latency_p50_s": percentile(g["latencies"], 50),
            "cpu_ms_per_request": 1000 * g["cpu_s"] / g["requests"],
        }
        for v, g in gathered.items()
    }
    off = results["off"]
    for figures in results.values():
        figures["latency_vs_off"] = figures["latency_p50_s"] / off["latency_p50_s"] - 1
        figures["cpu_vs_off"] = figures["cpu_ms_per_request"] / off["cpu_ms_per_request"] - 1
    results["span_exports"] = len(exports)
    return results


def report(results: dict) -> str:
    lines = [
        f"{'variant':<9} {'requests':>8} {'p50 latency':>12} {'vs off':>7} "
        f"{'CPU/request':>12} {'vs off':>7}"
    ]
    for variant in VARIANTS:
        r = results[variant]
        over = max(r["latency_vs_off"], r["cpu_vs_off"]) > LIMIT
        lines.append(
            f"{variant:<9} {r['requests']:>8} {r['latency_p50_s'] * 1000:>9.1f} ms "
            f"{r['latency_vs_off']:>+7.1%} {r['cpu_ms_per_request']:>9.1f} ms "
            f"{r['cpu_vs_off']:>+7.1%}" + (f"  over the {LIMIT:.0%} budget" if over else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="timed requests per variant")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--state-dir", default="bench/results/telemetry-state")
    parser.add_argument("--json", default="bench/results/telemetry.json")
    args = parser.parse_args(argv)
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    print(report(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
