"""Starting the embedded stack: an MLflow server (SQLite backend and a local artifact
store under SPARQ_HOME unless told otherwise) and the REST service, both on loopback
by default."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.secrets import OBJECT_STORE, RAY_AUTH, scrub_env
from workers.errors import SparqError


class StackError(SparqError):
    """A part of the local stack (MLflow, Ray, the API) did not start."""


def _die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the stack process dies, even by
    SIGKILL, so an MLflow server or a Ray head is never left behind (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not glibc: stop() still cleans up on a normal exit
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"process for {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise StackError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class Mlflow:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def ready(self, timeout: float = 120) -> Mlflow:
        """Wait until the server answers; one that does not is stopped, and said."""
        try:
            wait_http(f"{self.url}/health", timeout=timeout, proc=self.proc)
        except StackError as e:
            self.stop()
            raise StackError(f"MLflow server failed to start ({e}); see {self.log}") from e
        return self


def start_mlflow(
    home: Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    wait: bool = True,
) -> Mlflow:
    """``mlflow server`` with proxied artifacts: on SQLite under ``home/mlflow`` by
    default, or on ``backend_uri`` (SPARQ_MLFLOW_BACKEND_URI, e.g. a PostgreSQL URL)
    with artifacts in ``artifacts_destination`` (SPARQ_MLFLOW_ARTIFACTS_DESTINATION,
    e.g. ``s3://bucket/path``; the server's environment carries the credentials).

    Its environment is ours without the secrets it does not need, the object store's
    credentials kept (:mod:`service.secrets`); the backend URI, which may hold a
    password, goes in the environment too, not on the command line ``ps`` shows.

    ``wait=False`` returns as soon as it is spawned: ``sparq up`` starts the Ray head
    while MLflow migrates its store and imports its server (about 18 s and 6 s here,
    overlapped), then calls :meth:`Mlflow.ready`."""
    if port_in_use(host, port):
        raise StackError(f"--mlflow-port {port} is already in use on {host}; choose another port")
    root = home / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--artifacts-destination", artifacts_destination or str(root / "artifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {
        "MLFLOW_DISABLE_TELEMETRY": "true",  # no phoning home
        # No job runner: it starts nine processes (a runner and eight huey consumers,
        # each importing MLflow: about 30 s of CPU at every start of the stack, and
        # their polling after) for GenAI scorer jobs, which sparq never submits.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **scrub_env(os.environ, keep=OBJECT_STORE),
        "MLFLOW_BACKEND_STORE_URI": backend_uri or f"sqlite:///{root / 'mlflow.db'}",
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, preexec_fn=_die_with_parent,
        )  # fmt: skip
    server = Mlflow(proc, f"http://{host}:{port}", log)
    return server.ready() if wait else server


@contextmanager
def serve_in_thread(app: Any, host: str, port: int) -> Iterator[str]:
    """Run the API with uvicorn in a background thread (for `sparq demo` and tests)."""
    import uvicorn

    if port_in_use(host, port):
        raise StackError(f"--port {port} is already in use on {host}; choose another port")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        wait_http(f"{url}/v1/health", timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@dataclass
class RayHead:
    """A local Ray head started by the stack; search drivers join it by address."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            # `ray start --block` tears its node down (raylet, GCS, workers) on SIGTERM.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def ray_auth_env(home: Path) -> None:
    """Token authentication for the stack's Ray: a random token in ``home`` (0600),
    named in this process's environment so the head and every driver use it."""
    path = home / "ray_auth_token"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    os.environ.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(path), RAY_USAGE_STATS_ENABLED="0"
    )


RAY_PRELOAD = "torch,workers.jobs.trial"  # what every baseline and trial worker imports


def start_ray(home: Path, num_cpus: int | None = None, host: str = "127.0.0.1") -> RayHead:
    """``ray start --head --block`` on loopback, every port chosen free.

    One long-lived Ray for the whole service: each job's driver joins it in about a
    second instead of starting (and tearing down) a Ray of its own.
    """
    log = home / "ray.log"
    home.mkdir(parents=True, exist_ok=True)
    ray_auth_env(home)  # this process's drivers (the launcher's children) inherit it
    gcs = free_port(host)
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", host, "--port", str(gcs),
        "--dashboard-agent-listen-port", str(free_port(host)),
        "--include-dashboard", "false", "--disable-usage-stats",
        "--num-cpus", str(num_cpus or os.cpu_count() or 1),
    ]  # fmt: skip
    # Stopped (or its stack dead): no 30 s drain serving the old stack's drivers. The
    # service stops its drivers first, and after a crash they are resumed anew.
    # Its workers (the trials) inherit its environment: no secret but Ray's own.
    env = {
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # Every worker the head starts imports torch and the engine as it starts, before
        # its first task: the workers Ray prestarts for the stack's first job (one per
        # CPU, before any job exists) are warm when that job's baseline and first trials
        # reach them. (Ray binds a worker to the job it first serves, so later jobs start
        # their own; those import the same modules anyway.) As workers.search.driver's.
        "RAY_preload_python_modules": RAY_PRELOAD,
        **scrub_env(os.environ, keep=RAY_AUTH),
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent, env=env,
        )  # fmt: skip
    head = RayHead(proc, f"{host}:{gcs}", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"ray start exited with code {proc.returncode}; see {log}")
        if port_in_use(host, gcs) and b"Ray runtime started" in log.read_bytes():
            return head
        time.sleep(0.3)
    head.stop()
    raise StackError(f"Ray head did not start within 120 s; see {log}")
