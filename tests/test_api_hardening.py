"""The API's failure paths and defaults: what anonymous callers and admins see when things break."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_process_loads_no_worker_code():
    """The API starts and updates workflows by type name: no workflow code, no activities and
    no Kubernetes client in its process (they cost memory, and the API needs no cluster rights)."""
    probe = (
        "import sys, api.main; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "api" in loaded and "temporalio" in loaded, "the probe imported the API"
    assert not loaded & {"kubernetes", "activities", "workflows"}, sorted(loaded)
