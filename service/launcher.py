"""The launcher: one search driver process per job, and the truth about its end.

It starts queued jobs (at most ``max_running_jobs`` at once) and watches their driver
processes. A driver that dies mid-search is relaunched to resume its job (at most
``driver_restarts`` times); otherwise a job whose driver exits without recording an
outcome is marked failed with the reason, so no job is ever left ``running`` forever.
Cancellation is cooperative first (the driver's Tune stopper sees the flag and keeps
finished trials), then forced after a grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from service import store as st
from service.settings import Settings

log = logging.getLogger("sparq.launcher")
CANCEL_GRACE_S = 30.0
_LOG_TAIL_LINES = 8


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).strip()
    except OSError:
        return ""


class Launcher:
    def __init__(self, settings: Settings, store: st.JobStore, *, poll_s: float = 0.5) -> None:
        self.settings, self.store, self.poll_s = settings, store, poll_s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._cancel_deadline: dict[str, float] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self._adopt_orphans()
        self._thread = threading.Thread(target=self._loop, name="sparq-launcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; drivers still running are terminated and their jobs failed."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        with self._lock:
            for job_id, proc in list(self.procs.items()):
                if proc.poll() is None:
                    _terminate(proc)
                    proc.wait(timeout)
                self._settle(job_id, proc, "the service stopped while the job was running")
            self.procs.clear()

    def poke(self) -> None:
        """Look at the queue now rather than at the next poll."""
        self._wake.set()

    # -- actions -----------------------------------------------------------
    def cancel(self, job_id: str) -> st.Job:
        job = self.store.get(job_id)
        if job.status in st.TERMINAL:
            return job
        self.store.update(job_id, cancel_requested=True)
        if self.store.transition(
            job_id,
            {st.QUEUED},
            status=st.CANCELLED,
            finished_at=st.utcnow(),
            message="cancelled before it started",
        ):
            return self.store.get(job_id)
        with self._lock:
            self._cancel_deadline.setdefault(job_id, _now() + CANCEL_GRACE_S)
        self.poke()
        return self.store.get(job_id)

    # -- internals ---------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # keep watching; a transient DB error must not kill us
                log.exception("launcher pass failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def reconcile(self) -> None:
        with self._lock:
            for job_id, proc in list(self.procs.items()):
                code = proc.poll()
                if code is not None:
                    del self.procs[job_id]
                    if self._should_resume(job_id, proc):
                        self._spawn(job_id, resume=True)
                    else:
                        self._settle(job_id, proc, None)
                elif job_id in self._cancel_deadline and _now() > self._cancel_deadline[job_id]:
                    log.warning("job %s did not stop after cancel; terminating its driver", job_id)
                    _terminate(proc)
            running = len(self.procs)
            for job in reversed(self.store.list_jobs(status=st.QUEUED, limit=1000)):
                if running >= self.settings.max_running_jobs:
                    break
                if job.cancel_requested or job.id in self.procs:
                    continue  # a driver just spawned for it has not claimed it yet
                self._spawn(job.id)
                running += 1

    def _should_resume(self, job_id: str, proc: subprocess.Popen[bytes]) -> bool:
        """A driver that died mid-search (the job still ``running``, no cancel asked)
        is relaunched to resume from the Tune experiment state, a bounded number of
        times; the restart is counted and said in the job's message."""
        job = self.store.get(job_id)
        if job.status != st.RUNNING or job.cancel_requested or self._stop.is_set():
            return False
        if job.restarts >= self.settings.driver_restarts:
            return False
        n = job.restarts + 1
        self.store.update(
            job_id,
            restarts=n,
            message=f"the search driver (pid {proc.pid}) exited with code {proc.returncode} "
            f"mid-search; resuming it (restart {n} of at most {self.settings.driver_restarts})",
        )
        log.warning(
            "job %s: driver pid %d died (code %s); resuming", job_id, proc.pid, proc.returncode
        )
        return True

    def _spawn(self, job_id: str, *, resume: bool = False) -> None:
        job_dir = self.settings.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            SPARQ_HOME=str(self.settings.home),
            SPARQ_DATABASE_URL=self.settings.db_url,
            SPARQ_MLFLOW_TRACKING_URI=self.settings.mlflow_tracking_uri,
            PYTHONUNBUFFERED="1",
        )
        if self.settings.ray_address:
            env["SPARQ_RAY_ADDRESS"] = self.settings.ray_address
        if self.settings.ray_num_cpus:
            env["SPARQ_RAY_NUM_CPUS"] = str(self.settings.ray_num_cpus)
        with (job_dir / "driver.log").open("ab") as out:
            # The job id is on the command line so an operator finds it with `ps`.
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.driver", job_id, *(["--resume"] if resume else [])],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.procs[job_id] = proc
        log.info(
            "job %s: %s search driver pid %d", job_id, "resumed" if resume else "started", proc.pid
        )

    def _settle(self, job_id: str, proc: subprocess.Popen[bytes], reason: str | None) -> None:
        """Record the end of a driver: a job not in a final state is failed (or cancelled)."""
        self._cancel_deadline.pop(job_id, None)
        job = self.store.get(job_id)
        if job.status in st.TERMINAL:
            return
        if job.cancel_requested:
            self.store.transition(
                job_id,
                {st.QUEUED, st.RUNNING},
                status=st.CANCELLED,
                finished_at=st.utcnow(),
                message="cancelled; the driver was stopped before it could export",
            )
            return
        tail = log_tail(self.settings.job_dir(job_id) / "driver.log")
        why = reason or f"the search driver (pid {proc.pid}) exited with code {proc.returncode}"
        self.store.transition(
            job_id,
            {st.QUEUED, st.RUNNING},
            status=st.FAILED,
            finished_at=st.utcnow(),
            error=f"{why} before the job finished; last log lines:\n{tail}"[:5000],
        )

    def _adopt_orphans(self) -> None:
        """Jobs left running by a previous service whose driver is gone are failed."""
        for job in self.store.list_jobs(status=st.RUNNING, limit=1000):
            if not pid_alive(job.driver_pid):
                self.store.transition(
                    job.id,
                    {st.RUNNING},
                    status=st.FAILED,
                    finished_at=st.utcnow(),
                    error=f"the search driver (pid {job.driver_pid}) is gone: "
                    "the service restarted while the job ran",
                )


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the driver's whole session: Ray too
    except ProcessLookupError:
        pass


def _now() -> float:
    import time

    return time.monotonic()
