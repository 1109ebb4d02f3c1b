"""The benchmark entry point runs end to end at tiny sizes. Figures are printed, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_runs_at_tiny_sizes_and_writes_its_figures(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(  # noqa: S603 - this Python, our own module
        [sys.executable, "-m", "bench",
         "--latency-requests", "3", "--latency-warmup", "1",
         "--burst", "5", "--burst-concurrency", "5", "--burst-timeout", "20",
         "--reconcile", "20", "--no-plots", "--no-idle-probe",
         "--only", "latency", "--only", "burst", "--only", "reconcile",
         "--only", "live", "--live-keys", "5",
         "--state-dir", str(tmp_path / "state"), "--pycache", str(tmp_path / "pycache"),
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed

    headings = ("1. Latency", "2. Burst of 5", "3. Reconcile over 20", "4. Peak memory", "5. Live")
    for heading in headings:
        assert heading in printed, printed
    assert "target < 0.5" in printed  # targets are shown beside the figures, not enforced

    results = json.loads(out.read_text())
    assert results["latency"]["e2e_s"]["count"] == 3
    assert results["burst"]["accepted"] == 5
    assert results["bare"]["workflows"] == 5
    assert [r["pending_secrets"] for r in results["reconcile"]] == [20]
    assert results["memory"]["worker_after_burst_mb"] > 0
    assert results["memory"]["bare_api_mb"] > 0  # the API's yardstick took the same burst
    live = results["live"]
    assert live["create"]["waiting"]["with_expiry_and_next_reminder"] == 5
    assert live["with"]["burst"]["accepted"] == 5
    assert "error" not in results
