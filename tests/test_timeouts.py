"""Settings under which every activity attempt would time out stop the worker at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [("SMTP_TIMEOUT", "3m", "smtp.timeout (env SMTP_TIMEOUT)"),
     ("LITELLM_TIMEOUT", "90s", "litellm.timeout (env LITELLM_TIMEOUT)")],
)  # fmt: skip
def test_a_timeout_longer_than_its_activity_is_refused_at_start(variable, value, named):
    env = {"PATH": os.environ.get("PATH", ""), "ENVIRONMENT": "local", variable: value}
    done = subprocess.run(  # noqa: S603 - this Python, our own worker
        [sys.executable, "worker.py"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "must be" in done.stderr
