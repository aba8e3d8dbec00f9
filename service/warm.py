"""Warm drivers: the launcher's drivers forked from a process that has imported
everything a driver needs (:mod:`workers.search.zygote`), instead of each starting a
cold interpreter that imports Ray, Tune, Optuna, torch and MLflow for seconds.

:class:`WarmDrivers` starts that process with a driver's environment (:func:`driver_env`)
when the service starts, and is the launcher's spawner: it asks it for a driver and,
whenever it cannot have one (the process is still importing, died, or does not answer
within a few seconds), starts a cold driver exactly as before. A forked driver is the
same ``workers.search.driver.main`` in a session of its own with the job's
``driver.log``; it is watched like an adopted driver (pid + start time), and its exit
code is known from the file its parent writes when it reaps it.

Standard library only (no torch, no Ray): the service imports it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from service.launcher import AdoptedDriver, Driver, driver_env, log_tail, spawn_driver
from service.settings import Settings

log = logging.getLogger("sparq.warm")
ZYGOTE_MODULE = "workers.search.zygote"
ANSWER_S = 5.0  # a fork answers in milliseconds; past this, a cold driver instead
REAP_WAIT_S = 2.0  # how long a driver's exit code may take to be written
STARTING_WAIT_S = 60.0  # a job asked for while the warm process imports waits this long


class ForkedDriver(AdoptedDriver):
    """A driver the warm process forked: watched as an adopted one (pid and start time;
    it is not the service's child), but its exit code is known: read from what its
    parent wrote on reaping it."""

    def __init__(self, pid: int, started: str | None, exits: Path) -> None:
        super().__init__(pid, started)
        self.exits = exits

    def describe_exit(self) -> str:
        path = self.exits / f"{self.pid}-{self.started}"
        deadline = time.monotonic() + REAP_WAIT_S  # its parent reaps it within 0.2 s
        while True:
            try:
                return f"exited with code {path.read_text().strip()}"
            except OSError:
                if time.monotonic() > deadline:
                    return "exited (exit code unknown: its warm parent did not record it)"
                time.sleep(0.05)


class WarmDrivers:
    """The warm process and the launcher's spawner ``(job id, resume) -> Driver``."""

    def __init__(self, settings: Settings, *, target: str | None = None) -> None:
        self.settings = settings
        self.target = target  # tests: a stand-in for the driver's main
        self.run_dir = settings.home / "run"
        self.sock = self.run_dir / "zygote.sock"
        self.exits = self.run_dir / "exits"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.forked = 0  # drivers forked warm
        self.cold = 0  # drivers started cold (the warm process could not)

    # -- the warm process ----------------------------------------------------
    def start(self) -> None:
        """Start the warm process (its imports take seconds: drivers asked for
        meanwhile start cold). Its environment is a driver's."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                return
            self._ready.clear()
            self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            out = self.run_dir / "zygote.log"
            cmd = [sys.executable, "-m", ZYGOTE_MODULE, str(self.sock)]
            if self.target:
                cmd += ["--target", self.target]
            with out.open("ab") as err:
                self.proc = subprocess.Popen(
                    cmd,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    env=driver_env(self.settings),
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            proc = self.proc
        threading.Thread(target=self._watch, args=(proc,), name="sparq-warm", daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stdout is None:  # Popen(stdout=PIPE) always has it
            return
        line = proc.stdout.readline()  # "ready", or EOF if it died importing
        if line.strip() == b"ready":
            self._ready.set()
            log.info("warm driver process %d ready", proc.pid)
        else:
            tail = log_tail(self.run_dir / "zygote.log")
            log.warning("the warm driver process exited before it was ready: %s", tail)
        proc.stdout.read()  # until it exits; then drivers start cold
        self._ready.clear()

    def ready(self) -> bool:
        return self._ready.is_set() and self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and self.ready()

    def stop(self) -> None:
        """Stop the warm process (the drivers it forked go on: each is its own session)."""
        with self._lock:
            proc, self.proc = self.proc, None
        self._ready.clear()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    # -- the spawner -----------------------------------------------------------
    def __call__(self, job_id: str, resume: bool) -> Driver:
        proc = self.proc
        if proc is not None and proc.poll() is None and not self._ready.is_set():
            # still importing: a cold driver now would import the same on the same CPUs
            self.wait_ready(STARTING_WAIT_S)
        if self.ready():
            try:
                driver = self._fork(job_id, resume)
                self.forked += 1
                return driver
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("job %s: no warm driver (%s); starting a cold one", job_id, e)
        self.cold += 1
        return spawn_driver(self.settings, job_id, resume)

    def _fork(self, job_id: str, resume: bool) -> ForkedDriver:
        job_dir = self.settings.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        req = {"job_id": job_id, "resume": resume, "log": str(job_dir / "driver.log")}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(ANSWER_S)
            s.connect(str(self.sock))
            s.sendall((json.dumps(req) + "\n").encode())
            reply = json.loads(s.makefile("rb").readline())
        if "error" in reply:
            raise ValueError(reply["error"])
        return ForkedDriver(int(reply["pid"]), reply["started"], self.exits)


def _die_with_parent() -> None:
    """The warm process gets SIGTERM when the service dies (Linux), as the stack's
    servers do; the drivers it forked are not affected (fork clears the setting)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def enabled(settings: Settings) -> bool:
    return settings.warm_drivers and os.name == "posix"
