"""PNG plots of a benchmark run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_all(results: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (uv sync installs the dev group); no plots")
        return []
    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if results.get("latency", {}).get("samples_e2e_s"):
        written.append(_latency(results, out_dir / "latency.png"))
    if results.get("burst", {}).get("completion_times_s"):
        written.append(_burst(results, out_dir / "burst_drain.png"))
    return written


def _latency(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    lat = results["latency"]
    ms = sorted(s * 1000 for s in lat["samples_e2e_s"])
    e2e = lat["e2e_s"]
    fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    hist.hist(ms, bins=40, color="#4c72b0")
    hist.set_xlabel("POST /api/request-key -> email accepted (ms)")
    hist.set_ylabel("requests")
    hist.set_title(f"Latency histogram ({len(ms)} requests, sequential)")
    cdf.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], color="#4c72b0")
    for q, style in (("p50", "--"), ("p95", ":"), ("p99", "-.")):
        cdf.axvline(
            e2e[q] * 1000, color="grey", linestyle=style, label=f"{q} {e2e[q] * 1000:.0f} ms"
        )
    if bare := results.get("bare_latency", {}).get("samples_e2e_s"):
        bare_ms = sorted(b * 1000 for b in bare)
        cdf.plot(
            bare_ms,
            [(i + 1) / len(bare_ms) for i in range(len(bare_ms))],
            color="#55a868",
            label=f"bare workflow, p50 {bare_ms[len(bare_ms) // 2]:.0f} ms",
        )
    cdf.axvline(500, color="#c44e52", linewidth=1, label="target p50 500 ms")
    cdf.set_xlabel("latency (ms)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("Latency CDF")
    cdf.set_xlim(0, max(ms[-1] * 1.1, 550))
    cdf.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _burst(results: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    burst = results["burst"]
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    answers = burst["answer_times_s"]
    ax.step(
        answers,
        range(1, len(answers) + 1),
        where="post",
        color="#8c8c8c",
        label=f"ours: accepted (HTTP 200), {len(answers)}",
    )
    done = burst["completion_times_s"]
    ax.step(
        done,
        range(1, len(done) + 1),
        where="post",
        color="#4c72b0",
        label=f"ours: completed (email), {burst['completed_per_s']:.1f}/s",
    )
    if bare := results.get("bare"):
        closes = bare["completion_times_s"]
        rate = bare["completed_per_s"]
        label = f"bare 1-activity workflow: completed, {rate:.1f}/s"
        ax.step(closes, range(1, len(closes) + 1), where="post", color="#55a868", label=label)
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("requests / workflows")
    ax.set_title(f"Burst of {burst['requests']} ({burst['concurrency']} in flight): drain")
    ax.legend(loc="lower right", fontsize=8)
    samples = burst.get("rss_samples") or []
    if samples:
        t = [s["t"] for s in samples]
        mem.plot(t, [s.get("worker_rss_mb") for s in samples], label="worker RSS")
        mem.plot(t, [s.get("api_rss_mb") for s in samples], label="API RSS")
        mem.axhline(150, color="#c44e52", linewidth=1, label="target worker <= 150 MB")
        mem.axhline(90, color="#dd8452", linewidth=1, label="target API <= 90 MB")
        mem.set_ylim(bottom=0)
        mem.set_xlabel("seconds since the first request")
        mem.set_ylabel("MB")
        mem.set_title("Resident memory during the burst")
        mem.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
