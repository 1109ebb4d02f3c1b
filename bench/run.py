"""Benchmarks on the real local stack. Figures are printed and written as JSON; nothing is asserted.

    uv run python -m bench                      # all but live, default sizes (~3 minutes)
    uv run python -m bench --only latency --latency-requests 50
    uv run python -m bench --burst 200 --reconcile 1000
    uv run python -m bench --quick              # every figure at smaller sizes (~2 minutes)

1. latency: POST /api/request-key -> email accepted by the SMTP server, auto-approved requests,
   sent one after another (p50/p95/p99, and where the time goes, from the workflow histories);
2. burst: N requests at once (bounded concurrency): accepted, completed, lost, time to drain;
   then N bare one-activity workflows on the same server, for the throughput ratio; the same
   bare workflow is also run one after another, as the yardstick of the latency;
3. reconcile: one ReconcileWorkflow run over 1,000 and 10,000 pending Secrets whose workflows
   are running (started on a task queue no worker polls, so they stay in flight);
4. memory: peak RSS (VmHWM) of the worker and the API processes, beside a bare API (FastAPI and
   the Temporal client, one endpoint that starts the bare workflow) sent the same burst;
5. live (only when asked, `--only live`): 10,000 live keys waiting on their timers, and memory,
   latency and the burst ratio beside them and without them (`bench/live_keys.py`).

Every target is printed beside the figure, most as a ratio to a yardstick measured in the same
run (the bare workflow, or the smaller reconcile), because the machines are shared and absolute
figures wander; the load average at the start and end of each phase is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client as k8s
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from activities.key_request import new_secret
from activities.reconcile import SELECTORS
from bench.stack import (
    NAMESPACE,
    ROOT,
    TASK_QUEUE,
    Stack,
    memory_mb,
    temporal_version,
    thread_cpu_seconds,
)
from devstack.temporal import connect_when_ready
from domain import (
    SA_MODEL,
    SA_STATE,
    KeyRequest,
    ReconcilePage,
    request_id_for,
    workflow_id,
)
from workflows.reconcile import ReconcileWorkflow

TARGETS = {
    "latency_p50_s": ("<", 0.5),
    "latency_p99_s": ("<", 1.5),
    "reconcile_10000_s": ("<", 10.0),
    # Ratios to a yardstick measured in the same run.
    "burst_throughput_ratio": (">=", 0.65),
    "temporal_cpu_ratio": ("<=", 1.6),
    "worker_cpu_ratio": ("<=", 2.5),
    "latency_p50_ratio": ("<=", 1.4),
    "reconcile_scaling_ratio": ("<=", 11.0),
    "worker_peak_rss_mb": ("<=", 150.0),
    "api_peak_rss_mb": ("<=", 90.0),
}
# --quick: every figure of the report at sizes that finish in about two minutes.
QUICK = {
    "latency_requests": 40,
    "burst": 300,
    "reconcile": "1000,10000",
    "no_reconcile_profile": True,
    "no_idle_probe": True,
}
AUTO_APPROVED_MODEL = "gpt-4o-mini"  # config.yaml: example.com + gpt-4o-mini -> approve
MANUAL_MODEL = "gpt-4o"  # no rule matches -> approval.default (manual): the request waits
PARKED_QUEUE = "bench-parked"  # no worker polls it: workflows started here stay running
BARE_QUEUE = "bench-bare"
DEFAULT_REQUEST_ID_KEY = "llm-key-requestor"  # settings.request_id_key's default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--only",
        action="append",
        choices=["latency", "burst", "reconcile", "live"],
        help="run only these benchmarks (repeatable; default: all but live)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes, every figure still measured: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items() if v is not True)
        + ", no reconcile profile, no idle probe",
    )
    p.add_argument("--latency-requests", type=int, default=200)
    p.add_argument(
        "--latency-warmup",
        type=int,
        default=5,
        help="requests sent first and left out of the figures",
    )
    p.add_argument(
        "--burst",
        type=int,
        default=1000,
        help="requests in the burst, and bare workflows in the comparison",
    )
    p.add_argument(
        "--burst-concurrency",
        type=int,
        default=50,
        help="requests (and bare workflow starts) in flight at once",
    )
    p.add_argument(
        "--burst-timeout",
        type=float,
        default=300,
        help="give up waiting for the burst (and for the bare run) to drain after this",
    )
    p.add_argument(
        "--live-keys",
        type=int,
        default=10_000,
        help="live keys created for --only live (their requests sent --burst-concurrency at a "
        "time)",
    )
    p.add_argument(
        "--live-keys-via",
        choices=["temporal", "api"],
        default="temporal",
        help="start the live keys' workflows as the API does (temporal), or POST them (api)",
    )
    p.add_argument(
        "--reconcile",
        default="1000,10000",
        help="pending-Secret counts, comma-separated (cumulative: the Secrets of a "
        "smaller size stay for the next)",
    )
    p.add_argument(
        "--reconcile-page-size",
        default=str(ReconcilePage().page_size),
        help="Secrets per page (per activity) in the measured runs, comma-separated to run "
        "each size with each (the Schedule uses %(default)s)",
    )
    p.add_argument(
        "--no-reconcile-profile",
        action="store_true",
        help="skip timing the reconciler's parts (listing, decoding, visibility)",
    )
    p.add_argument(
        "--kube",
        choices=["standin", "real"],
        default="standin",
        help="the Kubernetes API: the stand-in (devstack/kube.py), or a real kube-apiserver on "
        "etcd (tests/kube_apiserver.py; build it first with scripts/build-kube-apiserver.sh)",
    )
    p.add_argument(
        "--sqlite-synchronous",
        default="normal",
        choices=["normal", "off"],
        help="the dev server's SQLite synchronous pragma (devstack uses normal)",
    )
    p.add_argument(
        "--server-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dynamic config value for the dev server (repeatable), for experiments, e.g. "
        "history.transferProcessorMaxPollRPS=1000",
    )
    p.add_argument(
        "--pycache",
        type=Path,
        default=ROOT / "bench" / "results" / "pycache",
        help="compiled bytecode of the services, compiled before they start, as the Docker "
        "image does (default: bench/results/pycache)",
    )
    p.add_argument(
        "--no-bytecode",
        action="store_true",
        help="run the services without compiled bytecode (every module compiled at start)",
    )
    p.add_argument(
        "--no-idle-probe",
        action="store_true",
        help="skip measuring one more, idle worker without compiled bytecode",
    )
    p.add_argument("--state-dir", type=Path, help="database and logs (default: beside the JSON)")
    p.add_argument("--keep-db", action="store_true", help="keep the Temporal database afterwards")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--plots",
        type=Path,
        default=ROOT / "bench" / "results" / "plots",
        help="where the PNG plots go",
    )
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


# --- small helpers -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": min(values),
        "mean": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
    }


async def bounded(items: list, concurrency: int, fn: Callable[[Any], Awaitable[Any]]) -> list:
    limit = asyncio.Semaphore(concurrency)

    async def one(item):
        async with limit:
            return await fn(item)

    return await asyncio.gather(*(one(i) for i in items))


async def until(predicate: Callable[[], Awaitable[bool]], within: float, every: float) -> bool:
    """Poll `predicate` until it holds or `within` seconds pass; a bounded loop."""
    deadline = time.monotonic() + within
    for _ in range(int(within / every) + 2):
        if await predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)
    return await predicate()


def epoch(ts) -> float:
    return ts.ToMicroseconds() / 1e6


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return Path("/proc/loadavg").read_text().split()[:3]


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per process between two readings, and the machine's besides: `others`
    (processes not ours), `interrupts` (irq/softirq: loopback networking) and `steal`."""
    delta = {k: round(after[k] - before[k], 2) for k in after if k in before}
    if "machine_processes" in delta:
        processes = delta.pop("machine_processes")
        ours = sum(v for k, v in delta.items() if not k.startswith("machine_"))
        delta["others"] = round(max(0.0, processes - ours), 2)
        delta["interrupts"] = delta.pop("machine_interrupts")
        delta["steal"] = delta.pop("machine_steal")
    return delta


def machine() -> dict:
    mem_kb = 0
    cpu_model = ""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    import temporalio

    return {
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "temporalio_sdk": temporalio.__version__,
        "temporal_cli": temporal_version(),
        "loadavg_at_start": loadavg(),
    }


# --- 1. latency ----------------------------------------------------------------------------


async def history_timeline(client: Client, wf_id: str, sent_wall: float, mail_wall: float):
    """Named segments (seconds) of one request, from its workflow history."""
    history = await client.get_workflow_handle(wf_id).fetch_history()
    started_at = epoch(history.events[0].event_time)
    segments = [("API: POST until workflow started", started_at - sent_wall)]
    scheduled: dict[int, tuple[str, float]] = {}
    previous_end = started_at
    for event in history.events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            at = epoch(event.event_time)
            scheduled[event.event_id] = (name, at)
            segments.append((f"workflow task before {name}", at - previous_end))
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = event.activity_task_completed_event_attributes
            name, at = scheduled[attrs.scheduled_event_id]
            end = epoch(event.event_time)
            if name == "notify_requester":
                segments.append(("notify_requester until SMTP accepted", mail_wall - at))
                break
            segments.append((f"activity {name}", end - at))
            previous_end = end
    return segments


async def bench_latency(stack: Stack, client: Client, n: int, warmup: int, tag: str) -> dict:
    assert stack.sink is not None
    samples: list[dict] = []
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        for i in range(warmup + n):
            email = f"lat-{tag}-{i}@example.com"
            sent, sent_wall = time.monotonic(), time.time()
            response = await http.post(
                "/api/request-key", json={"email": email, "llm": AUTO_APPROVED_MODEL}
            )
            answered = time.monotonic()
            if response.status_code != 200:
                failures.append(f"{email}: HTTP {response.status_code}")
                continue
            arrived = await asyncio.to_thread(stack.sink.arrival, email, 30)
            if arrived is None:
                failures.append(f"{email}: no email within 30 s")
                continue
            if i >= warmup:
                samples.append(
                    {
                        "workflow_id": response.json()["workflow_id"],
                        "sent_wall": sent_wall,
                        "post_s": answered - sent,
                        "e2e_s": arrived - sent,
                    }
                )
    e2e = [s["e2e_s"] for s in samples]

    async def timeline(sample: dict):
        mail_wall = sample["sent_wall"] + sample["e2e_s"]
        return await history_timeline(client, sample["workflow_id"], sample["sent_wall"], mail_wall)

    timelines = await bounded(samples, 8, timeline)
    by_segment: dict[str, list[float]] = {}
    order: list[str] = []
    for segments in timelines:
        for name, seconds in segments:
            if name not in by_segment:
                order.append(name)
            by_segment.setdefault(name, []).append(seconds)
    breakdown = {name: percentile(by_segment[name], 50) for name in order}
    return {
        "requests": n,
        "warmup": warmup,
        "mode": "sequential: one request at a time, the next sent once its email arrived",
        "e2e_s": summary(e2e),
        "post_s": summary([s["post_s"] for s in samples]),
        "breakdown_median_s": breakdown,
        "failures": failures,
        "samples_e2e_s": e2e,
    }


async def bench_bare_latency(stack: Stack, client: Client, n: int, warmup: int, tag: str) -> dict:
    """The yardstick of the latency: a bare one-activity workflow, one after another, from its
    start to its result, on the same server just after ours."""
    worker = await asyncio.to_thread(stack.start_bare_worker, BARE_QUEUE)
    samples: list[float] = []
    try:
        for i in range(warmup + n):
            t0 = time.monotonic()
            await client.execute_workflow(
                "BareWorkflow", i, id=f"bare-seq-{tag}-{i}", task_queue=BARE_QUEUE
            )
            if i >= warmup:
                samples.append(time.monotonic() - t0)
    finally:
        await asyncio.to_thread(worker.stop)
    return {
        "workflows": n,
        "warmup": warmup,
        "mode": "sequential: start, wait for the result, then the next",
        "e2e_s": summary(samples),
        "samples_e2e_s": samples,
    }


# --- 2. burst and the bare workflow -------------------------------------------------------


async def sample_memory(stack: Stack, stop: asyncio.Event, out: list, t0: float, limit: float):
    pids = {name: pid for name, pid in stack.pids().items() if name in ("worker", "api")}
    for _ in range(int(limit / 0.25) + 1):
        row: dict[str, float] = {"t": time.monotonic() - t0}
        for name, pid in pids.items():
            row[f"{name}_rss_mb"] = memory_mb(pid).get("VmRSS", float("nan"))
        out.append(row)
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
            return
        except TimeoutError:
            pass


async def bench_burst(stack: Stack, n: int, concurrency: int, limit_s: float, tag: str) -> dict:
    assert stack.sink is not None
    emails = [f"burst-{tag}-{i}@example.com" for i in range(n)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    cpu_before = stack.cpu()
    threads_before = thread_cpu_seconds(stack.pids()["worker"])
    memory_before = {k: memory_mb(stack.pids()[k]) for k in ("worker", "api")}
    stop_sampling, rss_samples = asyncio.Event(), []
    t0 = time.monotonic()
    sampler = asyncio.create_task(sample_memory(stack, stop_sampling, rss_samples, t0, limit_s))

    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, limits=limits) as http:

        async def submit(email: str):
            sent = time.monotonic()
            try:
                response = await http.post(
                    "/api/request-key", json={"email": email, "llm": AUTO_APPROVED_MODEL}
                )
                code: int | str = response.status_code
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            return email, sent - t0, time.monotonic() - t0, code

        answers = await bounded(emails, concurrency, submit)
    submitted = time.monotonic() - t0
    accepted = [a for a in answers if a[3] == 200]
    wanted = {a[0] for a in accepted}

    async def drained() -> bool:
        # Lookups, not a copy of every arrival so far: beside 10,000 live keys (--only live)
        # the copy ten times a second took a third of a core from the services measured.
        arrivals = stack.sink.arrivals
        return all(email in arrivals for email in wanted)

    await until(drained, max(1.0, limit_s - submitted), 0.1)
    arrivals = stack.sink.snapshot()
    stop_sampling.set()
    await sampler
    cpu_after = stack.cpu()
    threads_after = thread_cpu_seconds(stack.pids()["worker"])
    times = sorted(arrivals[e][0] - t0 for e in wanted if e in arrivals)
    duplicates = sum(1 for e in wanted if len(arrivals.get(e, [])) > 1)
    codes: dict[str, int] = {}
    for a in answers:
        codes[str(a[3])] = codes.get(str(a[3]), 0) + 1
    drain = times[-1] if times else float("nan")
    completed = len(times)
    return {
        "requests": n,
        "concurrency": concurrency,
        "accepted": len(accepted),
        "http_status_counts": codes,
        "completed": completed,
        "lost": len(accepted) - completed,
        "duplicate_emails": duplicates,
        "submit_s": submitted,
        "drain_s": drain,
        "completed_per_s": completed / drain if completed else 0.0,
        "accept_latency_s": summary([a[2] - a[1] for a in accepted]),
        "completion_times_s": times,
        "answer_times_s": sorted(a[2] for a in accepted),
        "cpu_s": cpu_delta(cpu_before, cpu_after),
        "worker_threads_cpu_s": {
            k: round(v - threads_before.get(k, 0.0), 2) for k, v in threads_after.items()
        },
        "memory_mb": {
            name: {"before": memory_before[name], "after": memory_mb(stack.pids()[name])}
            for name in ("worker", "api")
        },
        "rss_samples": rss_samples,
    }


async def bench_bare(
    stack: Stack, client: Client, n: int, concurrency: int, limit_s: float, tag: str
) -> dict:
    worker = await asyncio.to_thread(stack.start_bare_worker, BARE_QUEUE)
    try:
        cpu_before = stack.cpu()
        first_wall, t0 = time.time(), time.monotonic()

        async def start(i: int):
            await client.start_workflow(
                "BareWorkflow", i, id=f"bare-{tag}-{i}", task_queue=BARE_QUEUE
            )

        await bounded(list(range(n)), concurrency, start)
        submitted = time.monotonic() - t0
        query = f"WorkflowType = 'BareWorkflow' AND WorkflowId STARTS_WITH 'bare-{tag}-'"

        async def done() -> bool:
            count = await client.count_workflows(f"{query} AND ExecutionStatus = 'Completed'")
            return count.count >= n

        await until(done, max(1.0, limit_s - submitted), 0.25)
        cpu_after = stack.cpu()
        closes = sorted(
            [
                wf.close_time.timestamp() - first_wall
                async for wf in client.list_workflows(query)
                if wf.close_time is not None
            ]
        )
        memory = memory_mb(worker.pid)
        api_memory = await bare_api_burst(stack, client, n, concurrency, limit_s, tag)
    finally:
        await asyncio.to_thread(worker.stop)
    drain = closes[-1] if closes else float("nan")
    return {
        "workflows": n,
        "concurrency": concurrency,
        "completed": len(closes),
        "submit_s": submitted,
        "drain_s": drain,
        "completed_per_s": len(closes) / drain if closes else 0.0,
        "completion_times_s": closes,
        "cpu_s": cpu_delta(cpu_before, cpu_after),
        "worker_memory_mb": memory,
        "api_memory_mb": api_memory,
    }


async def bare_api_burst(
    stack: Stack, client: Client, n: int, concurrency: int, limit_s: float, tag: str
) -> dict[str, float]:
    """The API's yardstick: the same burst through a bare FastAPI + Temporal client app, its
    workflows run by the bare worker; returns the app's memory once they have all completed."""
    api, url = await asyncio.to_thread(stack.start_bare_api, BARE_QUEUE)
    try:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:

            async def start(i: int):
                response = await http.post("/start", json={"workflow_id": f"bare-api-{tag}-{i}"})
                response.raise_for_status()

            await bounded(list(range(n)), concurrency, start)
        query = (
            f"WorkflowType = 'BareWorkflow' AND WorkflowId STARTS_WITH 'bare-api-{tag}-' "
            "AND ExecutionStatus = 'Completed'"
        )

        async def done() -> bool:
            return (await client.count_workflows(query)).count >= n

        # Drained before the next phase, so that its figures carry none of this work.
        await until(done, limit_s, 0.25)
        return memory_mb(api.pid)
    finally:
        await asyncio.to_thread(api.stop)


# --- 3. reconcile --------------------------------------------------------------------------


def pending_request(i: int, tag: str) -> KeyRequest:
    email = f"pending-{tag}-{i}@example.com"
    request_id = request_id_for(email, MANUAL_MODEL, DEFAULT_REQUEST_ID_KEY)
    requested_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return KeyRequest(request_id, email, MANUAL_MODEL, requested_at)


async def create_pending(stack: Stack, client: Client, requests: list[KeyRequest]) -> dict:
    """Each request's pending Secret (as record_request writes it) and its running workflow."""
    serializer = k8s.ApiClient()
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    t0 = time.monotonic()
    async with httpx.AsyncClient(
        base_url=stack.standins["kube"],
        timeout=60,
        limits=limits,
        headers={"Authorization": f"Bearer {stack.kube_token}"},
        verify=stack.kube_verify,
    ) as http:

        async def create(request: KeyRequest):
            body = serializer.sanitize_for_serialization(new_secret(request))
            response = await http.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", json=body)
            if response.status_code != 201:
                raise RuntimeError(f"creating a Secret: {response.status_code} {response.text}")

        await bounded(requests, 32, create)
    secrets_s = time.monotonic() - t0

    t1 = time.monotonic()

    async def start(request: KeyRequest):
        await client.start_workflow(
            "KeyRequestWorkflow",
            request,
            id=workflow_id(request.request_id),
            task_queue=PARKED_QUEUE,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SA_STATE, "pending"),
                    SearchAttributePair(SA_MODEL, MANUAL_MODEL),
                ]
            ),
        )

    await bounded(requests, 64, start)
    workflows_s = time.monotonic() - t1
    return {
        "created": len(requests),
        "secrets_s": secrets_s,
        "secrets_per_s": len(requests) / secrets_s if secrets_s else 0.0,
        "workflows_s": workflows_s,
        "workflows_per_s": len(requests) / workflows_s if workflows_s else 0.0,
    }


async def reconcile_history(client: Client, wf_id: str) -> dict:
    history = await client.get_workflow_handle(wf_id).fetch_history()
    events = history.events
    started: dict[int, float] = {}
    scheduled: dict[int, float] = {}
    runs: list[float] = []
    queued: list[float] = []
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = epoch(event.event_time)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = event.activity_task_started_event_attributes
            started[attrs.scheduled_event_id] = epoch(event.event_time)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = event.activity_task_completed_event_attributes
            begin = started.get(attrs.scheduled_event_id, scheduled[attrs.scheduled_event_id])
            runs.append(epoch(event.event_time) - begin)
            queued.append(begin - scheduled[attrs.scheduled_event_id])
    total = epoch(events[-1].event_time) - epoch(events[0].event_time)
    return {
        "activities": len(scheduled),
        "history_events": len(events),
        "server_s": total,
        "activity_run_s": summary(runs),
        "activity_run_total_s": sum(runs),
        "between_activities_total_s": total - sum(runs),
        "continued_as_new": events[-1].event_type
        == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
    }


async def profile_reconcile_parts(stack: Stack, client: Client, page_size: int) -> dict:
    """Time what one reconcile activity does, per part, over the whole pending listing.

    From this process, one page after another (as the activities run): the Kubernetes
    listing over HTTP, decoding it into the official client's V1Secret objects, and
    the one visibility query per page.
    """
    api = k8s.CoreV1Api(k8s.ApiClient(_kube_configuration(stack)))
    selector = SELECTORS["pending"]
    token: str | None = None
    listing = decoding = visibility = 0.0
    pages = 0
    for _ in range(100_000 // page_size + 1):
        t0 = time.monotonic()
        raw = await asyncio.to_thread(
            api.list_namespaced_secret,
            NAMESPACE,
            label_selector=selector,
            limit=page_size,
            _continue=token,
            _preload_content=False,
        )
        data = raw.data
        t1 = time.monotonic()
        decoded = api.api_client.deserialize(data, "V1SecretList", "application/json")
        t2 = time.monotonic()
        ids = [workflow_id(s.metadata.name.removeprefix("llm-key-request-")) for s in decoded.items]
        quoted = ", ".join(f"'{i}'" for i in ids)
        found = [
            run
            async for run in client.list_workflows(
                f"WorkflowType = 'KeyRequestWorkflow' AND WorkflowId IN ({quoted})"
            )
        ]
        t3 = time.monotonic()
        assert len(found) >= len(ids)
        listing, decoding, visibility = listing + t1 - t0, decoding + t2 - t1, visibility + t3 - t2
        pages += 1
        token = decoded.metadata._continue or None
        if not token:
            break
    return {
        "pages": pages,
        "kubernetes_list_http_s": listing,
        "client_decode_s": decoding,
        "visibility_query_s": visibility,
    }


def _kube_configuration(stack: Stack) -> k8s.Configuration:
    from kubernetes import config as kube_config

    configuration = k8s.Configuration()
    kube_config.load_kube_config(
        config_file=stack.standins["kubeconfig"], client_configuration=configuration
    )
    return configuration


async def bench_reconcile(
    stack: Stack, client: Client, sizes: list[int], tag: str, profile: bool, pages: list[int]
) -> list[dict]:
    results = []
    existing = 0
    for size in sorted(sizes):
        log(f"reconcile: creating {size - existing} pending Secrets and running workflows")
        setup = await create_pending(
            stack, client, [pending_request(i, tag) for i in range(existing, size)]
        )
        existing = size
        running = "WorkflowType = 'KeyRequestWorkflow' AND ExecutionStatus = 'Running'"

        async def visible(query: str = running, wanted: int = size) -> bool:
            return (await client.count_workflows(query)).count >= wanted

        await until(visible, 60, 0.25)
        for page_size in pages:
            log(f"reconcile: ReconcileWorkflow over {size} pending Secrets, pages of {page_size}")
            results.append(
                await reconcile_once(stack, client, size, page_size, f"{tag}-{page_size}", profile)
            )
            results[-1]["setup"] = setup
    return results


async def reconcile_once(
    stack: Stack, client: Client, size: int, page_size: int, tag: str, profile: bool
) -> dict:
    wf_id = f"bench-reconcile-{size}-{tag}"
    load = loadavg()
    cpu_before = stack.cpu()
    t0 = time.monotonic()
    counts = await client.execute_workflow(
        ReconcileWorkflow.run,
        ReconcilePage(page_size=page_size),
        id=wf_id,
        task_queue=TASK_QUEUE,
    )
    elapsed = time.monotonic() - t0
    cpu_after = stack.cpu()
    result = {
        "pending_secrets": size,
        "page_size": page_size,
        "elapsed_s": elapsed,
        "counts": counts.__dict__,
        "history": await reconcile_history(client, wf_id),
        "cpu_s": cpu_delta(cpu_before, cpu_after),
        "loadavg": [load, loadavg()],
    }
    if profile:
        log("reconcile: timing its parts (listing, decoding, visibility) page by page")
        result["parts"] = await profile_reconcile_parts(stack, client, page_size)
    return result


# --- report --------------------------------------------------------------------------------


def verdict(name: str, value: float) -> str:
    op, limit = TARGETS[name]
    return f"target {op} {limit:g}: {'met' if meets(name, value) else 'MISSED'}"


def meets(name: str, value: float) -> bool:
    op, limit = TARGETS[name]
    return {"<": value < limit, "<=": value <= limit, ">=": value >= limit}[op]


def report(results: dict) -> list[dict]:
    """Print the figures beside their targets; return the target checks."""
    checks = []

    def line(
        label: str,
        value: str,
        target: str | None = None,
        key: str | None = None,
        number: float | None = None,
    ) -> None:
        if key is not None and number is not None:
            target = verdict(key, number)
            op, limit = TARGETS[key]
            checks.append(
                {
                    "figure": key,
                    "value": number,
                    "target": f"{op} {limit:g}",
                    "met": meets(key, number),
                }
            )
        print(f"  {label:<44} {value:>16}   {target or ''}")

    print()
    print("=" * 100)
    m = results["machine"]
    print(
        f"machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}; Python {m['python']}; "
        f"temporalio {m['temporalio_sdk']}; {m['temporal_cli']}"
    )
    print(f"Temporal dev server SQLite pragmas: {', '.join(results['temporal_pragmas'])}")
    print(f"Kubernetes API: {results.get('kube', 'standin')}")
    if results.get("temporal_dynamic_config"):
        print(f"Temporal dynamic config: {', '.join(results['temporal_dynamic_config'])}")
    if lat := results.get("latency"):
        e2e, post = lat["e2e_s"], lat["post_s"]
        print(
            f"\n1. Latency, POST /api/request-key -> email accepted ({lat['requests']} requests, "
            f"{lat['mode'].split(':')[0]}, auto-approved)"
        )
        if e2e.get("count"):
            line("p50", f"{e2e['p50'] * 1000:.0f} ms", key="latency_p50_s", number=e2e["p50"])
            line("p95", f"{e2e['p95'] * 1000:.0f} ms")
            line("p99", f"{e2e['p99'] * 1000:.0f} ms", key="latency_p99_s", number=e2e["p99"])
            line("max", f"{e2e['max'] * 1000:.0f} ms")
            line("POST answered (p50)", f"{post['p50'] * 1000:.0f} ms")
            print("  where the time goes (median of each part):")
            for name, seconds in lat["breakdown_median_s"].items():
                line(f"  {name}", f"{seconds * 1000:.1f} ms")
        if lat["failures"]:
            line("failures", str(len(lat["failures"])))
    if burst := results.get("burst"):
        print(f"\n2. Burst of {burst['requests']} requests ({burst['concurrency']} in flight)")
        line("accepted (HTTP 200)", str(burst["accepted"]))
        line("completed (email accepted by SMTP)", str(burst["completed"]))
        line("lost (accepted, no email)", str(burst["lost"]))
        line("duplicate emails", str(burst["duplicate_emails"]))
        line("all submitted after", f"{burst['submit_s']:.1f} s")
        line("drained after (first POST -> last email)", f"{burst['drain_s']:.1f} s")
        line("completed requests / s", f"{burst['completed_per_s']:.1f}")
        if bare := results.get("bare"):
            line(
                f"bare 1-activity workflows / s ({bare['completed']})",
                f"{bare['completed_per_s']:.1f}",
            )
            ratio = results["burst_throughput_ratio"]
            line("ratio ours / bare", f"{ratio:.2f}", key="burst_throughput_ratio", number=ratio)
        cpu = burst["cpu_s"]
        line("CPU s during the burst", ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())))
        threads = burst["worker_threads_cpu_s"]
        line(
            "worker CPU s by thread", ", ".join(f"{k} {v:.1f}" for k, v in sorted(threads.items()))
        )
    if lat := results.get("bare_latency"):
        e2e = lat["e2e_s"]
        if e2e.get("count"):
            n = lat["workflows"]
            print(f"\n1b. Bare one-activity workflow, sequential ({n}): the latency yardstick")
            line("p50", f"{e2e['p50'] * 1000:.0f} ms")
            line("p99", f"{e2e['p99'] * 1000:.0f} ms")
    for rec in results.get("reconcile", []):
        n = rec["pending_secrets"]
        print(
            f"\n3. Reconcile over {n} pending Secrets (workflows running; pages of "
            f"{rec['page_size']})"
        )
        default_pages = rec["page_size"] == ReconcilePage().page_size
        key = "reconcile_10000_s" if n == 10000 and default_pages else None
        line(
            "one ReconcileWorkflow run",
            f"{rec['elapsed_s']:.2f} s",
            key=key,
            number=rec["elapsed_s"] if key else None,
        )
        c = rec["counts"]
        line("scanned / in flight / pages", f"{c['scanned']} / {c['in_flight']} / {c['pages']}")
        line(
            "other outcomes (resumed, relayed, ...)",
            str(c["resumed"] + c["relayed"] + c["corrected"] + c["skipped"]),
        )
        h = rec["history"]
        line("activities per run", str(h["activities"]))
        inside, outside = h["activity_run_total_s"], h["between_activities_total_s"]
        line("activity time (sum) / outside activities", f"{inside:.2f} / {outside:.2f} s")
        cpu = rec["cpu_s"]
        line("CPU s during the run", ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())))
        line("load average before / after", f"{rec['loadavg'][0][0]} / {rec['loadavg'][1][0]}")
        if parts := rec.get("parts"):
            line(
                "  parts: Kubernetes list (HTTP, stand-in)",
                f"{parts['kubernetes_list_http_s']:.2f} s",
            )
            line("  parts: decode into V1Secret objects", f"{parts['client_decode_s']:.2f} s")
            line("  parts: visibility queries", f"{parts['visibility_query_s']:.2f} s")
        s = rec["setup"]
        line("setup: Secrets created / s", f"{s['secrets_per_s']:.0f}")
        line("setup: workflows started / s", f"{s['workflows_per_s']:.0f}")
    if mem := results.get("memory"):
        print(f"\n4. Peak memory (VmHWM; bytecode {results['bytecode']})")
        rows = [
            ("worker_at_start_mb", "worker, at start"),
            ("worker_after_burst_mb", "worker, after the burst"),
            ("api_after_burst_mb", "API, after the burst"),
            ("worker_at_end_mb", "worker, at the end"),
            ("api_at_end_mb", "API, at the end"),
            ("idle_worker_no_bytecode_mb", "a worker without compiled bytecode, idle"),
            ("bare_worker_mb", "bare workflow worker (yardstick)"),
            ("bare_api_mb", "bare API, after the same burst (yardstick)"),
        ]
        for name, label in rows:
            if mem.get(name) is None:
                continue
            if name == "worker_after_burst_mb" or (
                name == "worker_at_end_mb" and mem.get("worker_after_burst_mb") is None
            ):
                line(label, f"{mem[name]:.0f} MB", key="worker_peak_rss_mb", number=mem[name])
            elif name == "api_after_burst_mb" or (
                name == "api_at_end_mb" and mem.get("api_after_burst_mb") is None
            ):
                line(label, f"{mem[name]:.0f} MB", key="api_peak_rss_mb", number=mem[name])
            else:
                line(label, f"{mem[name]:.0f} MB")
        if mem.get("api_after_burst_mb") and mem.get("bare_api_mb"):
            line(
                "API / bare API, after the burst",
                f"{mem['api_after_burst_mb'] / mem['bare_api_mb']:.2f}",
            )
    if found := results.get("ratios"):
        print("\n5. Cost targets: ours / the yardstick measured in this run")
        for key, r in found.items():
            unit = r["unit"]
            line(
                r["what"],
                f"{r['value']:.2f}",
                key=key,
                number=r["value"],
            )
            print(f"  {'':<44} {'':>16}   ({r['ours']:.1f} {unit} / {r['yardstick']:.1f} {unit})")
    load = [m.get("loadavg_at_start"), m.get("loadavg_at_end")]
    print(f"\nload average (1, 5, 15 min) at start / end: {load[0]} / {load[1]}")
    for name in ("latency", "burst", "bare"):
        if phase := results.get(name):
            if "loadavg" in phase:
                print(f"  {name}: {phase['loadavg'][0]} -> {phase['loadavg'][1]}")
    if live := results.get("live"):
        from bench.live_keys import report_live

        report_live(live)
    print("=" * 100, flush=True)
    return checks


# --- main ----------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, stack: Stack, results: dict) -> None:
    client = await connect_when_ready(stack.temporal.address)
    tag = uuid.uuid4().hex[:6]
    results["memory"] = {"worker_at_start_mb": memory_mb(stack.pids()["worker"]).get("VmHWM")}
    only = set(args.only or ["latency", "burst", "reconcile"])
    if "latency" in only and args.latency_requests > 0:
        log(f"latency: {args.latency_warmup} warm-up + {args.latency_requests} requests")
        load = loadavg()
        results["latency"] = await bench_latency(
            stack, client, args.latency_requests, args.latency_warmup, tag
        )
        log(f"bare latency: {args.latency_warmup} warm-up + {args.latency_requests} workflows")
        results["bare_latency"] = await bench_bare_latency(
            stack, client, args.latency_requests, args.latency_warmup, tag
        )
        results["latency"]["loadavg"] = [load, loadavg()]
    if "burst" in only and args.burst > 0:
        log(f"burst: {args.burst} requests, {args.burst_concurrency} in flight")
        load = loadavg()
        results["burst"] = burst = await bench_burst(
            stack, args.burst, args.burst_concurrency, args.burst_timeout, tag
        )
        burst["loadavg"] = [load, loadavg()]
        pids = stack.pids()
        results["memory"]["worker_after_burst_mb"] = memory_mb(pids["worker"]).get("VmHWM")
        results["memory"]["api_after_burst_mb"] = memory_mb(pids["api"]).get("VmHWM")
        if stack.pycache is not None and not args.no_idle_probe:
            log("memory: one more worker, idle, without compiled bytecode")
            idle = await asyncio.to_thread(stack.idle_worker_memory, None)
            results["memory"]["idle_worker_no_bytecode_mb"] = idle.get("VmHWM")
        log(f"bare: {args.burst} one-activity workflows, one worker process")
        load = loadavg()
        results["bare"] = bare = await bench_bare(
            stack, client, args.burst, args.burst_concurrency, args.burst_timeout, tag
        )
        bare["loadavg"] = [load, loadavg()]
        results["memory"]["bare_worker_mb"] = bare["worker_memory_mb"].get("VmHWM")
        results["memory"]["bare_api_mb"] = bare["api_memory_mb"].get("VmHWM")
        if bare["completed_per_s"]:
            results["burst_throughput_ratio"] = burst["completed_per_s"] / bare["completed_per_s"]
    sizes = [int(s) for s in args.reconcile.split(",") if s.strip() and int(s) > 0]
    pages = [int(s) for s in args.reconcile_page_size.split(",") if s.strip() and int(s) > 0]
    if "reconcile" in only and sizes:
        results["reconcile"] = await bench_reconcile(
            stack, client, sizes, tag, not args.no_reconcile_profile, pages
        )
    if "live" in only and args.live_keys > 0:
        from bench.live_keys import bench_live

        results["live"] = await bench_live(stack, client, args, tag)
    pids = stack.pids()
    results["memory"]["worker_at_end_mb"] = memory_mb(pids["worker"]).get("VmHWM")
    results["memory"]["api_at_end_mb"] = memory_mb(pids["api"]).get("VmHWM")
    results["machine"]["loadavg_at_end"] = loadavg()
    results["ratios"] = ratios(results)


def ratios(results: dict) -> dict[str, dict]:
    """Each target of the cost issue: ours, the yardstick measured in the same run, and ours /
    yardstick. Only the figures this run measured."""
    out: dict[str, dict] = {}

    def add(key: str, ours: float | None, yardstick: float | None, unit: str, what: str):
        if ours is None or not yardstick:
            return
        out[key] = {
            "ours": ours,
            "yardstick": yardstick,
            "value": ours / yardstick,
            "unit": unit,
            "what": what,
        }

    burst, bare = results.get("burst"), results.get("bare")
    if burst and bare and burst["completed"] and bare["completed"]:
        add("burst_throughput_ratio", burst["completed_per_s"], bare["completed_per_s"], "/s",
            "burst throughput, ours / bare workflow")  # fmt: skip
        ours_cpu, bare_cpu = burst["cpu_s"], bare["cpu_s"]
        add("temporal_cpu_ratio", 1000 * ours_cpu.get("temporal", 0) / burst["completed"],
            1000 * bare_cpu.get("temporal", 0) / bare["completed"], "ms",
            "Temporal CPU per request / per bare workflow")  # fmt: skip
        add("worker_cpu_ratio", 1000 * ours_cpu.get("worker", 0) / burst["completed"],
            1000 * bare_cpu.get("bare", 0) / bare["completed"], "ms",
            "worker CPU per request / bare worker per workflow")  # fmt: skip
    lat, bare_lat = results.get("latency"), results.get("bare_latency")
    if lat and bare_lat and lat["e2e_s"].get("count") and bare_lat["e2e_s"].get("count"):
        add("latency_p50_ratio", 1000 * lat["e2e_s"]["p50"], 1000 * bare_lat["e2e_s"]["p50"],
            "ms", "latency p50, ours / bare workflow sequential")  # fmt: skip
    default_pages = ReconcilePage().page_size
    runs = {
        r["pending_secrets"]: r["elapsed_s"]
        for r in results.get("reconcile", [])
        if r["page_size"] == default_pages
    }
    if 1000 in runs and 10000 in runs:
        add("reconcile_scaling_ratio", runs[10000], runs[1000], "s",
            "reconcile: time for 10,000 / for 1,000")  # fmt: skip
    return out


def _terminate(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # so that the stack is stopped on the way out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = ROOT / "bench" / "results"
    state = args.state_dir or out_dir / f"run-{stamp}"
    json_paths = [out_dir / f"run-{stamp}.json"] if args.state_dir is None else []
    if args.json:
        json_paths.append(args.json)
    results: dict[str, Any] = {
        "command": "uv run python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": stamp,
        "machine": machine(),
    }
    log(f"starting the stack in {state}")
    t0 = time.monotonic()
    pycache = None if args.no_bytecode else args.pycache.resolve()
    if pycache is not None:  # this process too: it imports the Kubernetes client's big modules
        sys.pycache_prefix, sys.dont_write_bytecode = str(pycache), False
    stack = Stack(
        state,
        pycache,
        synchronous=args.sqlite_synchronous,
        dynamic_config=tuple(args.server_config),
        real_kube=args.kube == "real",
    )
    results["bytecode"] = "compiled beforehand (cached)" if pycache else "none: compiled at start"
    results["kube"] = args.kube
    status = 0
    try:
        if pycache is not None:
            log(f"compiling bytecode ({stack.precompile():.1f} s)")
            t0 = time.monotonic()
        stack.start()
        results["temporal_pragmas"] = stack.temporal.pragmas
        results["temporal_dynamic_config"] = list(args.server_config)
        results["stack_start_s"] = time.monotonic() - t0
        log(f"stack ready in {results['stack_start_s']:.1f} s")
        asyncio.run(run_all(args, stack, results))
    except Exception as exc:  # the figures so far are still worth writing
        results["error"] = f"{type(exc).__name__}: {exc}"
        print(f"benchmark failed: {results['error']}", file=sys.stderr, flush=True)
        status = 1
    finally:
        stack.stop()
        if not args.keep_db:
            for db in state.glob("temporal.db*"):
                db.unlink()
    results["total_s"] = time.monotonic() - t0
    results["targets"] = report(results) if "temporal_pragmas" in results else []
    for path in json_paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"results: {path}")
    if not args.no_plots:
        from bench.plots import plot_all

        for path in plot_all(results, args.plots):
            print(f"plot: {path}")
    print(f"total {results['total_s']:.0f} s", flush=True)
    return status
