"""The launcher: one search driver process per job, and the truth about its end.

It starts queued jobs, oldest first (at most ``max_running_jobs`` drivers at once),
and watches their driver processes. A driver that dies mid-search is relaunched to
resume its job (at most ``driver_restarts`` times); otherwise a job whose driver
exits without recording an outcome is marked failed with the reason, so no job is
ever left ``running`` forever. A driver is forgotten only once its end is recorded:
if the store fails meanwhile, the next pass tries again.

A service that restarts adopts the drivers the last one left running (recognised by
pid *and* start time, see :mod:`service.procs`) and watches them like its own; a
driver that is gone is resumed, and one that joined another Ray cluster (the stack
was restarted: its Ray head is gone) is killed and resumed.

Cancellation is cooperative first (the driver's Tune stopper sees the flag and keeps
finished trials), then SIGTERM to the driver's process group after a grace period,
then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service import store as st
from service.procs import process_start, same_process, signal_group
from service.secrets import RAY_AUTH, scrub_env
from service.settings import Settings

log = logging.getLogger("sparq.launcher")
CANCEL_GRACE_S = 30.0  # cooperative cancel: time to stop Tune and export what finished
KILL_AFTER_S = 15.0  # SIGTERM not obeyed within this long: SIGKILL
_LOG_TAIL_LINES = 8
# A driver whose Ray head died gives up reconnecting after this long (Ray's default
# is 60 s), so it exits and is resumed soon after a Ray restart.
_RAY_RECONNECT_ENV = ("RAY_gcs_rpc_server_reconnect_timeout_s", "20")


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).strip()
    except OSError:
        return ""


class Driver(Protocol):
    """A search driver process as the launcher watches it, whether it is this
    service's child or one adopted from a service that ran before."""

    @property
    def pid(self) -> int: ...

    @property
    def started(self) -> str | None: ...

    def running(self) -> bool: ...

    def describe_exit(self) -> str:
        """How it ended, for messages: ``exited with code -9``."""
        ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class ChildDriver:
    """A driver this service started: its exit code is known."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.started = process_start(proc.pid)

    def running(self) -> bool:
        return self.proc.poll() is None

    def describe_exit(self) -> str:
        return f"exited with code {self.proc.returncode}"

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc.returncode is None:  # once reaped, its pid may be someone else's
            signal_group(self.pid, sig)


class AdoptedDriver:
    """A driver known by its pid and start time only (a previous service started it):
    alive while that pid is still the process that started then; its exit code is
    unknown. ``gone`` says what is known of its end instead."""

    def __init__(self, pid: int, started: str | None, gone: str | None = None) -> None:
        self.pid, self.started = pid, started
        self.gone = gone or "exited (exit code unknown: it was not this service's child)"

    def running(self) -> bool:
        return same_process(self.pid, self.started)

    def describe_exit(self) -> str:
        return self.gone

    def terminate(self) -> None:
        if self.running():
            signal_group(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.running():
            signal_group(self.pid, signal.SIGKILL)


Spawner = Callable[[str, bool], Driver]  # (job id, resume) -> the started driver


@dataclass
class _Stopping:
    """A driver being stopped after a cancel: SIGTERM at ``term_at``, SIGKILL
    ``KILL_AFTER_S`` later."""

    term_at: float
    kill_at: float | None = None  # set once SIGTERM is sent
    killed: bool = False


def driver_env(settings: Settings) -> dict[str, str]:
    """The environment of a search driver: ours without the secrets it does not need
    (no API token: user code runs in the driver; see :mod:`service.secrets`), plus
    where the store, MLflow and Ray are (the settings win over inherited SPARQ_
    variables)."""
    env = scrub_env(os.environ, keep=RAY_AUTH)
    env.update(
        SPARQ_HOME=str(settings.home),
        SPARQ_DATABASE_URL=settings.db_url,
        SPARQ_MLFLOW_TRACKING_URI=settings.mlflow_tracking_uri,
        # the code the API allowed; the driver and its workers check it again
        SPARQ_ENTRYPOINT_MODULES=",".join(settings.entrypoint_modules),
        PYTHONUNBUFFERED="1",
    )
    # where baseline.weights may be read from: the driver hands it to the baseline task
    env["SPARQ_WEIGHTS_DIRS"] = ",".join(str(d) for d in settings.weights_dirs)
    if settings.ray_address:
        env["SPARQ_RAY_ADDRESS"] = settings.ray_address
    if settings.ray_num_cpus:
        env["SPARQ_RAY_NUM_CPUS"] = str(settings.ray_num_cpus)
    env.setdefault(*_RAY_RECONNECT_ENV)
    return env


def spawn_driver(settings: Settings, job_id: str, resume: bool) -> ChildDriver:
    """Start ``python -m workers.search.driver JOB [--resume]`` in its own session (so its
    process group is the driver and a local Ray it starts), logging to the job's
    ``driver.log``. The job id is on the command line so an operator finds it with
    ``ps``."""
    job_dir = settings.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    with (job_dir / "driver.log").open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.search.driver",
                job_id,
                *(["--resume"] if resume else []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=driver_env(settings),
            start_new_session=True,
        )
    return ChildDriver(proc)


class Launcher:
    def __init__(
        self,
        settings: Settings,
        store: st.JobStore,
        *,
        poll_s: float = 0.5,
        now: Callable[[], float] = time.monotonic,
        spawner: Spawner | None = None,
    ) -> None:
        self.settings, self.store, self.poll_s, self.now = settings, store, poll_s, now
        self.spawner: Spawner = spawner or (
            lambda job_id, resume: spawn_driver(settings, job_id, resume)
        )
        self.procs: dict[str, Driver] = {}
        self._stopping: dict[str, _Stopping] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        self.adopt()
        self._thread = threading.Thread(target=self._loop, name="sparq-launcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching; drivers still running are stopped, and their jobs are left
        ``running`` to be resumed from their saved state when the service starts again
        (a job whose cancel was asked is recorded cancelled)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        with self._lock:
            alive = [d for d in self.procs.values() if d.running()]
            for driver in alive:
                driver.terminate()
            deadline = time.monotonic() + timeout  # a real wait, whatever self.now is
            while any(d.running() for d in alive) and time.monotonic() < deadline:
                time.sleep(0.05)
            for driver in alive:
                if driver.running():
                    driver.kill()
            for job_id, driver in list(self.procs.items()):
                try:
                    self._interrupted(job_id, driver)
                except Exception:
                    log.exception("job %s: could not record its end at shutdown", job_id)
            self.procs.clear()

    def _interrupted(self, job_id: str, driver: Driver) -> None:
        job = self.store.get(job_id)
        if job.status in st.TERMINAL:
            return
        if job.cancel_requested or job.status == st.JobStatus.QUEUED:
            self._settle(job_id, driver, "the service stopped while the job was starting")
            return
        self.store.update(
            job_id,
            message="interrupted: the service stopped while the job ran; it resumes from "
            "its saved state when the service starts again",
        )

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
            {st.JobStatus.QUEUED},
            status=st.JobStatus.CANCELLED,
            finished_at=st.utcnow(),
            message="cancelled before it started",
        ):
            return self.store.get(job_id)
        with self._lock:
            self._stop_later(job_id, CANCEL_GRACE_S)
        self.poke()
        return self.store.get(job_id)

    # -- start-up ----------------------------------------------------------
    def adopt(self) -> None:
        """Take over from the service that ran before: every job it left ``running``
        (or queued with its driver already started) gets a watched driver. A live one
        whose start time matches is adopted; one that joined another Ray cluster is
        killed; a gone one is watched as dead, so the first pass resumes the job or
        records its end like any driver's."""
        with self._lock:
            for job in self.store.list_jobs(status=st.JobStatus.RUNNING, limit=None):
                self.procs[job.id] = self._adopted(job)
            for job in self.store.list_jobs(status=st.JobStatus.QUEUED, limit=None):
                if same_process(job.driver_pid, job.driver_started):
                    self.procs[job.id] = self._adopted(job)

    def _adopted(self, job: st.Job) -> Driver:
        pid = job.driver_pid or 0
        if not same_process(pid, job.driver_started):
            why = "was gone when the service started" if pid else "never recorded its pid"
            return AdoptedDriver(pid, job.driver_started, f"{why} (exit code unknown)")
        address, ours = job.driver_ray_address, self.settings.ray_address
        if address and address != ours:
            return self._stop_stale(job, pid, address, ours)
        log.info("job %s: adopted its running search driver pid %d", job.id, pid)
        if job.cancel_requested:
            self._stop_later(job.id, CANCEL_GRACE_S)
        return AdoptedDriver(pid, job.driver_started)

    def _stop_stale(self, job: st.Job, pid: int, address: str, ours: str | None) -> Driver:
        """A driver that joined a Ray address this service does not use: the whole stack
        was restarted, its Ray head is gone and it can never finish. It is killed at
        once (SIGKILL to its process group), not sent SIGTERM first: Ray's handler in
        the driver turns SIGTERM into ``SystemExit`` and the driver would mark its own
        job failed, where the job is to be resumed (its Tune state is saved every
        second; a driver without its Ray head has nothing else to save)."""
        log.warning("job %s: driver pid %d joined Ray at %s, not %s; killing it",
                    job.id, pid, address, ours)  # fmt: skip
        driver = AdoptedDriver(
            pid,
            job.driver_started,
            f"was killed: it had joined Ray at {address}, which this service "
            f"({ours or 'a local Ray per driver'}) no longer uses",
        )
        driver.kill()
        return driver

    # -- the watch ---------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # keep watching; a transient DB error must not kill us
                log.exception("launcher pass failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def reconcile(self) -> None:
        """One pass: record the end of drivers that exited, push on the ones being
        stopped, then start queued jobs into the free slots."""
        with self._lock:
            for job_id, driver in list(self.procs.items()):
                try:
                    if driver.running():
                        self._escalate(job_id, driver)
                    else:
                        self._finish(job_id, driver)
                except Exception:  # this job waits for the next pass; the others go on
                    log.exception("job %s: could not record its driver's state", job_id)
            free = self.settings.max_running_jobs - len(self.procs)
            for job_id in self.store.queued_ids(free, exclude=self.procs):
                self._start(job_id, resume=False)

    def _stop_later(self, job_id: str, delay: float) -> None:
        """Schedule SIGTERM in ``delay`` s, SIGKILL ``KILL_AFTER_S`` later (a cancel
        asked twice keeps the first schedule)."""
        when = self.now() + delay
        current = self._stopping.get(job_id)
        if current is None or when < current.term_at:
            self._stopping[job_id] = _Stopping(term_at=when)

    def _escalate(self, job_id: str, driver: Driver) -> None:
        stopping = self._stopping.get(job_id)
        if stopping is None:
            return
        now = self.now()
        if stopping.kill_at is None and now >= stopping.term_at:
            log.warning("job %s: terminating its driver pid %d", job_id, driver.pid)
            driver.terminate()
            stopping.kill_at = now + KILL_AFTER_S
        elif stopping.kill_at is not None and not stopping.killed and now >= stopping.kill_at:
            log.warning("job %s: driver pid %d ignored SIGTERM; killing it", job_id, driver.pid)
            driver.kill()
            stopping.killed = True

    def _finish(self, job_id: str, driver: Driver) -> None:
        """A driver exited: resume its job or record its end, and only then forget
        it. If the store fails on the way, the driver stays watched and the next pass
        tries again, so the job is never left ``running`` with no one watching."""
        job = self.store.get(job_id)
        if self._should_resume(job) and self._count_restart(job, driver):
            self._stopping.pop(job_id, None)
            self._start(job_id, resume=True)  # the new driver replaces this one
            return
        self._settle(job_id, driver, None)
        del self.procs[job_id]
        self._stopping.pop(job_id, None)

    def _should_resume(self, job: st.Job) -> bool:
        """A driver that died mid-search (the job still ``running``, no cancel asked)
        is relaunched to resume from the Tune experiment state, a bounded number of
        times."""
        return (
            job.status == st.JobStatus.RUNNING
            and not job.cancel_requested
            and not self._stop.is_set()
            and job.restarts < self.settings.driver_restarts
        )

    def _count_restart(self, job: st.Job, driver: Driver) -> bool:
        """Count the restart and say it in the job's message, before the spawn (a
        restart the store never heard of could repeat forever). False if the job left
        ``running`` meanwhile."""
        n = job.restarts + 1
        how = driver.describe_exit()
        log.warning("job %s: driver pid %d %s; resuming", job.id, driver.pid, how)
        return self.store.transition(
            job.id,
            {st.JobStatus.RUNNING},
            restarts=n,
            message=f"the search driver (pid {driver.pid}) {how} mid-search; "
            f"resuming it (restart {n} of at most {self.settings.driver_restarts})",
        )

    def _start(self, job_id: str, *, resume: bool) -> None:
        """Spawn a driver and record its pid, start time and Ray address at once (the
        driver records them again when it claims the job): a service that dies before
        the claim leaves the row naming the live driver, so the next one adopts it
        rather than starting a second driver on the same job."""
        driver = self.spawner(job_id, resume)
        self.procs[job_id] = driver
        log.info("job %s: %s search driver pid %d", job_id,
                 "resumed" if resume else "started", driver.pid)  # fmt: skip
        self.store.update(
            job_id,
            driver_pid=driver.pid,
            driver_started=driver.started,
            driver_ray_address=self.settings.ray_address,
        )

    def _settle(self, job_id: str, driver: Driver, reason: str | None) -> None:
        """Record the end of a driver: a job not in a final state is failed (or
        cancelled, if that was asked)."""
        job = self.store.get(job_id)
        if job.status in st.TERMINAL:
            return
        if job.cancel_requested:
            self.store.transition(
                job_id,
                {st.JobStatus.QUEUED, st.JobStatus.RUNNING},
                status=st.JobStatus.CANCELLED,
                finished_at=st.utcnow(),
                message="cancelled; the driver was stopped before it could export",
            )
            return
        tail = log_tail(self.settings.job_dir(job_id) / "driver.log")
        why = reason or f"the search driver (pid {driver.pid}) {driver.describe_exit()}"
        restarted = f" (restarted {job.restarts} times)" if job.restarts else ""
        self.store.transition(
            job_id,
            {st.JobStatus.QUEUED, st.JobStatus.RUNNING},
            status=st.JobStatus.FAILED,
            finished_at=st.utcnow(),
            error=f"{why} before the job finished{restarted}; last log lines:\n{tail}"[:5000],
        )
