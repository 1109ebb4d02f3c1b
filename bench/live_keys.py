"""Live keys waiting on their timers: what thousands of open request workflows cost.

    uv run python -m bench --only live                      # 10,000 live keys, ~20 minutes
    uv run python -m bench --only live --live-keys 1000

A request's workflow follows its key's whole life (30 days by default): after the email it waits
on durable timers (reminders, expiry, clean-up). A deployment therefore has as many workflows
open as there are live keys. In one run, on one stack, this phase measures

1. without them: the memory of the worker, Temporal and the API, idle; the sequential latency
   of new requests; a burst and as many bare workflows (the throughput ratio);
2. the creation of N live keys: real auto-approved requests, each through the worker's whole
   pipeline (Secret, policy, LiteLLM key, email) until its workflow waits on its timers, the
   burst's concurrency in flight at a time (a request is in flight until its email arrived:
   started all at once, 10,000 new workflows would compete for the worker's workflow cache,
   a different benchmark). `--live-keys-via temporal` (the default) starts each workflow
   as the API does (`connection.start_key_request`, same input, id and search attributes),
   without the API's HTTP layer and its wait for the policy's answer; `--live-keys-via api`
   POSTs them. Memory is sampled on the way, and the end is checked from visibility (every one
   running, its memo naming the expiry and the next reminder) and from a few histories (the
   last event is the timer);
3. with them: the same figures again.

The measurements of 1 and 3 leave their own requests' keys live too: each snapshot says how
many request workflows were open when it was taken.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from datetime import UTC, datetime

import httpx
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from bench.run import (
    AUTO_APPROVED_MODEL,
    DEFAULT_REQUEST_ID_KEY,
    bench_bare,
    bench_burst,
    bench_latency,
    bounded,
    cpu_delta,
    log,
)
from bench.stack import TASK_QUEUE, Stack, cpu_seconds, memory_mb
from connection import start_key_request
from domain import KeyRequest, request_id_for, workflow_id
from settings import load_settings

OPEN_REQUESTS = "WorkflowType = 'KeyRequestWorkflow' AND ExecutionStatus = 'Running'"
PROCESSES = ("worker", "temporal", "api", "standins")


async def bench_live(stack: Stack, client: Client, args: argparse.Namespace, tag: str) -> dict:
    # As the worker reads it: the same config.yaml and environment.
    cache = load_settings().worker_max_cached_workflows
    result: dict = {"keys": args.live_keys, "worker_sticky_cache": cache}
    log("live: memory of the fresh stack")
    result["fresh"] = await snapshot(stack, client)
    log("live: latency, burst and bare workflows without the live keys")
    result["without"] = await measure(stack, client, args, f"{tag}-before")
    result["idle_without"] = await snapshot(stack, client)
    log(
        f"live: creating {args.live_keys} live keys ({args.live_keys_via}), "
        f"{args.burst_concurrency} requests at a time"
    )
    result["create"] = await create_live_keys(
        stack, client, args.live_keys, args.burst_concurrency, args.live_keys_via, f"{tag}-live"
    )
    result["idle_with"] = await snapshot(stack, client)
    log(f"live: latency, burst and bare workflows beside {args.live_keys} live keys")
    result["with"] = await measure(stack, client, args, f"{tag}-after")
    result["idle_end"] = await snapshot(stack, client)
    return result


# --- measuring -----------------------------------------------------------------------------


async def settle(stack: Stack, within: float = 120) -> float:
    """Wait until the worker is idle (at most 2 % of a core for 2 s in a row), at most `within`
    seconds, so that memory is read between pieces of work; returns the seconds waited."""
    pid = stack.pids()["worker"]
    t0 = time.monotonic()
    last, quiet = cpu_seconds(pid), 0
    for _ in range(int(within) + 1):
        await asyncio.sleep(1)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now - last <= 0.02 else 0
        last = now
        if quiet >= 2:
            break
    return time.monotonic() - t0


def processes_memory(stack: Stack) -> dict[str, float | None]:
    """VmRSS (now) and VmHWM (peak since start) of each process of the stack, in MB."""
    pids = stack.pids()
    row: dict[str, float | None] = {}
    for name in PROCESSES:
        memory = memory_mb(pids[name]) if name in pids else {}
        row[f"{name}_rss_mb"] = memory.get("VmRSS")
        row[f"{name}_peak_mb"] = memory.get("VmHWM")
    return row


def database_mb(stack: Stack) -> float:
    """The Temporal dev server's SQLite database with its write-ahead log."""
    return sum(p.stat().st_size for p in stack.state.glob("temporal.db*")) / 1e6


async def snapshot(stack: Stack, client: Client) -> dict:
    waited = await settle(stack)
    return {
        "open_requests": (await client.count_workflows(OPEN_REQUESTS)).count,
        "settled_after_s": round(waited, 1),
        "temporal_db_mb": database_mb(stack),
        **processes_memory(stack),
    }


async def measure(stack: Stack, client: Client, args: argparse.Namespace, tag: str) -> dict:
    """What `python -m bench --only latency --only burst` measures, at the run's sizes."""
    cpu_before = stack.cpu()
    latency = await bench_latency(stack, client, args.latency_requests, args.latency_warmup, tag)
    latency["cpu_s"] = cpu_delta(cpu_before, stack.cpu())
    burst = await bench_burst(stack, args.burst, args.burst_concurrency, args.burst_timeout, tag)
    bare = await bench_bare(
        stack, client, args.burst, args.burst_concurrency, args.burst_timeout, tag
    )
    ratio = burst["completed_per_s"] / bare["completed_per_s"] if bare["completed_per_s"] else 0
    return {"latency": latency, "burst": burst, "bare": bare, "burst_throughput_ratio": ratio}


# --- creating the live keys ----------------------------------------------------------------


async def create_live_keys(
    stack: Stack, client: Client, n: int, concurrency: int, via: str, tag: str
) -> dict:
    """N auto-approved requests, each until its workflow waits on its timers."""
    assert stack.sink is not None
    sink = stack.sink
    emails = [f"live-{tag}-{i}@example.com" for i in range(n)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    cpu_before = stack.cpu()
    t0 = time.monotonic()
    progress: list[dict] = []
    codes: dict[str, int] = {}
    posted = 0

    def emailed() -> int:
        arrivals = sink.snapshot()
        return sum(1 for e in emails if e in arrivals)

    def note() -> dict:
        done = emailed()
        elapsed = time.monotonic() - t0
        row = {"t_s": round(elapsed, 1), "posted": posted, "emailed": done}
        row.update(processes_memory(stack))
        progress.append(row)
        log(
            f"live: {done}/{n} keys emailed ({done / elapsed:.1f}/s), {posted} posted; RSS "
            f"worker {row['worker_rss_mb']:.0f} MB, Temporal {row['temporal_rss_mb']:.0f} MB"
        )
        return row

    async def report_progress(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 15)
            except TimeoutError:
                note()

    stop = asyncio.Event()
    reporter = asyncio.create_task(report_progress(stop))
    try:
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, limits=limits) as http:

            async def submit(email: str) -> None:
                nonlocal posted
                try:
                    if via == "api":
                        response = await http.post(
                            "/api/request-key", json={"email": email, "llm": AUTO_APPROVED_MODEL}
                        )
                        code = str(response.status_code)
                    else:
                        await start_key_request(client, TASK_QUEUE, new_request(email))
                        code = "200"
                except Exception as exc:  # counted and reported, like an HTTP error
                    code = type(exc).__name__
                codes[code] = codes.get(code, 0) + 1
                posted += 1
                if code == "200":
                    await email_arrived(email)

            async def email_arrived(email: str) -> None:
                # A plain read of the sink's dict: its writer adds keys, never removes them.
                for _ in range(600):
                    if email in sink.arrivals:
                        return
                    await asyncio.sleep(0.1)

            await bounded(emails, concurrency, submit)
    finally:
        stop.set()
        await reporter
    emailed_s = time.monotonic() - t0
    last = note()
    log("live: waiting for the worker to be idle, then checking every workflow waits")
    settled_s = await settle(stack)
    waiting = await waiting_on_timers(client, emails)
    elapsed = time.monotonic() - t0
    return {
        "requests": n,
        "via": via,
        "concurrency": concurrency,
        "http_status_counts": codes,
        "emailed": last["emailed"],
        "emailed_s": emailed_s,
        "idle_after_s": settled_s,
        "elapsed_s": elapsed,
        "keys_per_s": last["emailed"] / emailed_s if emailed_s else 0.0,
        "cpu_s": cpu_delta(cpu_before, stack.cpu()),
        "waiting": waiting,
        "progress": progress,
    }


def new_request(email: str) -> KeyRequest:
    """The workflow input the API builds for a new submission."""
    request_id = request_id_for(email, AUTO_APPROVED_MODEL, DEFAULT_REQUEST_ID_KEY)
    requested_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return KeyRequest(request_id, email, AUTO_APPROVED_MODEL, requested_at)


async def waiting_on_timers(client: Client, emails: list[str]) -> dict:
    """How many of these requests' workflows are running with the key's life in their memo
    (published just before the workflow waits), and the last event of a few histories."""
    ids = {
        workflow_id(request_id_for(e, AUTO_APPROVED_MODEL, DEFAULT_REQUEST_ID_KEY)) for e in emails
    }
    running = 0
    waiting = 0
    async for execution in client.list_workflows(OPEN_REQUESTS, page_size=1000):
        if execution.id not in ids:
            continue
        running += 1
        memo = await execution.memo()
        if memo.get("key_expires") and memo.get("next_reminder"):
            waiting += 1
    sample = random.Random(0).sample(sorted(ids), min(5, len(ids)))

    async def last_event(wf_id: str) -> str:
        history = await client.get_workflow_handle(wf_id).fetch_history()
        return EventType.Name(history.events[-1].event_type)

    last = await bounded(sample, 5, last_event)
    return {
        "running": running,
        "with_expiry_and_next_reminder": waiting,
        "last_event_of_sample": sorted(set(last)),
    }


# --- report --------------------------------------------------------------------------------


def report_live(live: dict) -> None:
    create, before, after = live["create"], live["without"], live["with"]
    n = live["keys"]
    print(
        f"\n5. Live keys waiting on their timers: {n} created ({create['via']}) in "
        f"{create['emailed_s']:.0f} s ({create['keys_per_s']:.1f}/s, "
        f"{create['concurrency']} at a time)"
    )
    w = create["waiting"]
    print(
        f"  running: {w['running']}, memo with expiry and next reminder: "
        f"{w['with_expiry_and_next_reminder']}, last event of a sample: "
        f"{', '.join(w['last_event_of_sample'])}; HTTP {create['http_status_counts']}"
    )

    def row(label: str, *values: str) -> None:
        print(f"  {label:<40}" + "".join(f"{v:>17}" for v in values))

    snaps = [live["fresh"], live["idle_without"], live["idle_with"], live["idle_end"]]
    row("idle, between the phases:", "fresh", "without", f"with {n}", "at the end")
    row("open request workflows", *(str(s["open_requests"]) for s in snaps))
    for name, label in (("worker", "worker"), ("temporal", "Temporal"), ("api", "API")):
        figures = [f"{s[name + '_rss_mb']:.0f} / {s[name + '_peak_mb']:.0f}" for s in snaps]
        row(f"{label} RSS / peak (MB)", *figures)
    row("Temporal database (MB)", *(f"{s['temporal_db_mb']:.0f}" for s in snaps))
    both = (before, after)
    row("new requests:", "without", f"with {n}")
    lat = [m["latency"]["e2e_s"] for m in both]
    if all(x.get("count") for x in lat):
        row(
            "latency p50 / p95 (ms)", *(f"{x['p50'] * 1e3:.0f} / {x['p95'] * 1e3:.0f}" for x in lat)
        )
    row("burst completed/s", *(f"{m['burst']['completed_per_s']:.1f}" for m in both))
    row(
        "burst accepted (HTTP 200) / lost",
        *(f"{m['burst']['accepted']} / {m['burst']['lost']}" for m in both),
    )
    row("bare workflows/s", *(f"{m['bare']['completed_per_s']:.1f}" for m in both))
    row("ratio ours / bare", *(f"{m['burst_throughput_ratio']:.2f}" for m in both))
    for part in ("latency", "burst", "bare"):
        row(f"others' CPU s during {part}", *(f"{m[part]['cpu_s']['others']:.1f}" for m in both))
    row("others' CPU s while creating the keys", f"{create['cpu_s']['others']:.1f}")
