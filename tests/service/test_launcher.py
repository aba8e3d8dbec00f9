"""The launcher on a real job store (SQLite in a temporary directory) with fake
drivers and a fake clock; adoption is watched on real processes (``sleep``), since
what it checks is the process table. No Ray, no search."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc

from service import store as st
from service.launcher import (
    CANCEL_GRACE_S,
    KILL_AFTER_S,
    AdoptedDriver,
    Launcher,
    driver_env,
)
from service.procs import process_start, same_process
from service.settings import Settings

RAY = "127.0.0.1:6379"
SPEC: dict[str, Any] = {"name": "t", "search": {"trials": 4}}


class FakeDriver:
    """A driver that runs until told it exited; it obeys SIGKILL only, so every
    escalation step shows."""

    def __init__(self, pid: int) -> None:
        self.pid, self.started = pid, f"start-{pid}"
        self.code: int | None = None
        self.signals: list[str] = []

    def running(self) -> bool:
        return self.code is None

    def describe_exit(self) -> str:
        return f"exited with code {self.code}"

    def terminate(self) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")
        self.code = -9


class Spawner:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.drivers: list[FakeDriver] = []

    def __call__(self, job_id: str, resume: bool) -> FakeDriver:
        self.calls.append((job_id, resume))
        # Above the kernel's pid_max (4194304): never a real process.
        self.drivers.append(FakeDriver(5_000_000 + len(self.drivers)))
        return self.drivers[-1]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path, database_url=None, ray_address=RAY, max_running_jobs=2, driver_restarts=2
    ).prepare()


@pytest.fixture
def store(settings: Settings) -> Iterator[st.JobStore]:
    s = st.JobStore(settings.db_url)
    yield s
    s.close()


@pytest.fixture
def spawner() -> Spawner:
    return Spawner()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def launcher(settings: Settings, store: st.JobStore, spawner: Spawner, clock: Clock) -> Launcher:
    return Launcher(settings, store, now=clock, spawner=spawner)


@pytest.fixture
def live() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a real process in its own session (as the launcher starts drivers);
    ``ignore_term``: one that shrugs SIGTERM off. All are killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(ignore_term: bool = False) -> subprocess.Popen[bytes]:
        script = ("trap '' TERM; " if ignore_term else "") + "exec sleep 60"
        proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
        started.append(proc)
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep"):
            assert time.monotonic() < deadline, "sleep never started"
            time.sleep(0.01)  # exec'd: the trap (if any) is in place
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _queued(store: st.JobStore, n: int) -> list[str]:
    """n queued jobs, created a second apart (oldest first)."""
    t0 = st.utcnow()
    ids = []
    for i in range(n):
        job = store.create(SPEC)
        store.update(job.id, created_at=t0 + timedelta(seconds=i))
        ids.append(job.id)
    return ids


def _running(store: st.JobStore, **fields: Any) -> str:
    """A job a driver claimed (the way workers.search.driver.main does)."""
    job_id = store.create(SPEC).id
    assert store.transition(job_id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING, **fields)
    return job_id


def _running_on(store: st.JobStore, proc: subprocess.Popen[bytes], **fields: Any) -> str:
    fields = {"driver_started": process_start(proc.pid), "driver_ray_address": RAY, **fields}
    return _running(store, driver_pid=proc.pid, **fields)


def _gone(proc: subprocess.Popen[bytes]) -> None:
    """Wait until a signalled process has died (a zombie until the test reaps it)."""
    deadline = time.monotonic() + 10
    while process_start(proc.pid) is not None:
        assert time.monotonic() < deadline, f"pid {proc.pid} is still alive"
        time.sleep(0.01)


# -- the queue -------------------------------------------------------------------


def test_queued_jobs_start_oldest_first_into_the_free_slots_only(
    launcher: Launcher, store: st.JobStore, spawner: Spawner
) -> None:
    ids = _queued(store, 4)
    store.update(ids[1], cancel_requested=True)  # asked to cancel: never started

    launcher.reconcile()
    assert spawner.calls == [(ids[0], False), (ids[2], False)]
    launcher.reconcile()  # not claimed yet (still queued): not started twice
    assert len(spawner.calls) == 2
    row = store.get(ids[0])
    assert (row.driver_pid, row.driver_started, row.driver_ray_address) == (
        spawner.drivers[0].pid,
        spawner.drivers[0].started,
        RAY,
    )

    store.update(ids[0], status=st.JobStatus.SUCCEEDED)  # its driver finished the job and exited
    spawner.drivers[0].code = 0
    launcher.reconcile()
    assert spawner.calls[2:] == [(ids[3], False)]
    assert set(launcher.procs) == {ids[2], ids[3]}


def test_queued_ids_reads_ids_oldest_first_up_to_the_limit(store: st.JobStore) -> None:
    ids = _queued(store, 5)
    store.update(ids[0], status=st.JobStatus.RUNNING)
    assert store.queued_ids(2) == ids[1:3]
    assert store.queued_ids(10, exclude={ids[2]}) == [ids[1], ids[3], ids[4]]
    assert store.queued_ids(0) == []


# -- drivers that die ------------------------------------------------------------


def test_a_dead_driver_is_resumed_within_the_restarts_then_the_job_fails_with_why(
    launcher: Launcher, store: st.JobStore, spawner: Spawner, settings: Settings
) -> None:
    (job_id,) = _queued(store, 1)
    launcher.reconcile()
    store.transition(
        job_id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING
    )  # the driver claims it
    for n in (1, 2):
        spawner.drivers[-1].code = -9
        launcher.reconcile()
        assert spawner.calls[-1] == (job_id, True)
        job = store.get(job_id)
        assert (job.status, job.restarts) == (st.JobStatus.RUNNING, n)
        assert f"exited with code -9 mid-search; resuming it (restart {n} of at most 2)" in (
            job.message or ""
        )
        assert job.driver_pid == spawner.drivers[-1].pid  # recorded at the spawn

    settings.job_dir(job_id).mkdir(parents=True)
    (settings.job_dir(job_id) / "driver.log").write_text("...\nKilled by the OOM killer\n")
    spawner.drivers[-1].code = -9
    launcher.reconcile()
    job = store.get(job_id)
    assert job.status == st.JobStatus.FAILED
    assert len(spawner.calls) == 3
    assert "exited with code -9 before the job finished (restarted 2 times)" in (job.error or "")
    assert "Killed by the OOM killer" in (job.error or "")
    assert launcher.procs == {}


def test_a_store_error_while_settling_keeps_the_driver_watched_until_it_is_recorded(
    launcher: Launcher,
    store: st.JobStore,
    spawner: Spawner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (job_id,) = _queued(store, 1)
    launcher.reconcile()
    store.update(job_id, status=st.JobStatus.RUNNING, restarts=2)  # no restart left
    spawner.drivers[0].code = 1
    real = store.transition
    failures = [sqlalchemy.exc.OperationalError("UPDATE jobs", {}, Exception("locked"))]

    def flaky(*args: Any, **kwargs: Any) -> bool:
        if failures:
            raise failures.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "transition", flaky)
    launcher.reconcile()  # the error is logged, not raised
    assert store.get(job_id).status == st.JobStatus.RUNNING
    assert job_id in launcher.procs

    launcher.reconcile()
    job = store.get(job_id)
    assert job.status == st.JobStatus.FAILED
    assert "exited with code 1" in (job.error or "")
    assert launcher.procs == {}


def test_a_driver_that_exits_before_its_claim_fails_the_queued_job(
    launcher: Launcher, store: st.JobStore, spawner: Spawner
) -> None:
    (job_id,) = _queued(store, 1)
    launcher.reconcile()
    spawner.drivers[0].code = 1  # e.g. an import error
    launcher.reconcile()
    job = store.get(job_id)
    assert job.status == st.JobStatus.FAILED
    assert "exited with code 1" in (job.error or "")
    assert spawner.calls == [(job_id, False)]  # a failed job is not started again


# -- cancel ----------------------------------------------------------------------


def test_cancel_asks_first_then_sigterm_after_the_grace_then_sigkill(
    launcher: Launcher, store: st.JobStore, spawner: Spawner, clock: Clock
) -> None:
    (job_id,) = _queued(store, 1)
    launcher.reconcile()
    store.transition(job_id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING)
    driver = spawner.drivers[0]

    assert launcher.cancel(job_id).cancel_requested
    clock.t += CANCEL_GRACE_S - 0.1
    launcher.reconcile()
    assert driver.signals == []  # the cooperative stop has its grace
    clock.t += 0.2
    launcher.reconcile()
    assert driver.signals == ["TERM"]
    clock.t += KILL_AFTER_S - 0.2
    launcher.reconcile()
    assert driver.signals == ["TERM"]
    clock.t += 0.3
    launcher.reconcile()
    assert driver.signals == ["TERM", "KILL"]

    launcher.reconcile()  # it is dead now
    job = store.get(job_id)
    assert job.status == st.JobStatus.CANCELLED
    assert "stopped before it could export" in (job.message or "")
    assert spawner.calls == [(job_id, False)]  # a cancelled job is not resumed


def test_cancel_of_a_queued_job_never_starts_it(
    launcher: Launcher, store: st.JobStore, spawner: Spawner
) -> None:
    (job_id,) = _queued(store, 1)
    assert launcher.cancel(job_id).status == st.JobStatus.CANCELLED
    launcher.reconcile()
    assert spawner.calls == []


# -- adoption at start-up --------------------------------------------------------


def test_a_live_driver_with_its_start_time_is_adopted_and_counts_toward_the_limit(
    launcher: Launcher,
    store: st.JobStore,
    spawner: Spawner,
    settings: Settings,
    live: Callable[..., subprocess.Popen[bytes]],
) -> None:
    settings.max_running_jobs = 1
    proc = live()
    job_id = _running_on(store, proc)
    (queued,) = _queued(store, 1)

    launcher.adopt()
    launcher.reconcile()
    assert isinstance(launcher.procs[job_id], AdoptedDriver)
    assert spawner.calls == []  # the adopted driver holds the only slot
    assert store.get(job_id).status == st.JobStatus.RUNNING

    proc.kill()
    _gone(proc)
    launcher.reconcile()  # it died mid-search: resumed in its slot, the queue waits
    assert spawner.calls == [(job_id, True)]
    job = store.get(job_id)
    assert job.restarts == 1
    assert f"(pid {proc.pid}) exited (exit code unknown" in (job.message or "")
    assert queued not in launcher.procs


def test_a_reused_pid_is_not_adopted_but_its_job_resumed(
    launcher: Launcher,
    store: st.JobStore,
    spawner: Spawner,
    live: Callable[..., subprocess.Popen[bytes]],
) -> None:
    stranger = live()  # holds the recorded pid, but started at another time
    job_id = _running(
        store, driver_pid=stranger.pid, driver_started="12345", driver_ray_address=RAY
    )

    launcher.adopt()
    launcher.reconcile()
    assert spawner.calls == [(job_id, True)]
    assert "was gone when the service started" in (store.get(job_id).message or "")
    assert stranger.poll() is None  # never signalled
    assert launcher.procs[job_id] is spawner.drivers[0]


def test_a_running_job_with_a_dead_driver_and_no_restarts_left_fails_clearly(
    launcher: Launcher, store: st.JobStore, spawner: Spawner
) -> None:
    job_id = _running(store, driver_pid=5_000_123, driver_started="1", restarts=2)
    launcher.adopt()
    launcher.reconcile()
    job = store.get(job_id)
    assert job.status == st.JobStatus.FAILED
    assert "(pid 5000123) was gone when the service started" in (job.error or "")
    assert spawner.calls == []


def test_a_running_job_asked_to_cancel_whose_driver_is_gone_is_cancelled(
    launcher: Launcher, store: st.JobStore, spawner: Spawner
) -> None:
    job_id = _running(store, driver_pid=5_000_123, driver_started="1", cancel_requested=True)
    launcher.adopt()
    launcher.reconcile()
    assert store.get(job_id).status == st.JobStatus.CANCELLED
    assert spawner.calls == []


def test_a_live_driver_of_another_ray_is_killed_at_once_and_its_job_resumed(
    launcher: Launcher,
    store: st.JobStore,
    spawner: Spawner,
    live: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """Killed, not sent SIGTERM: Ray's SIGTERM handler would make the driver fail its
    own job (this one shrugs SIGTERM off, so only a SIGKILL ends it)."""
    proc = live(ignore_term=True)  # stuck reconnecting to a Ray head that is gone
    job_id = _running_on(store, proc, driver_ray_address="10.0.0.9:6379")

    launcher.adopt()
    _gone(proc)
    launcher.reconcile()
    assert spawner.calls == [(job_id, True)]
    job = store.get(job_id)
    assert job.status == st.JobStatus.RUNNING
    assert "was killed: it had joined Ray at 10.0.0.9:6379" in (job.message or "")
    assert job.restarts == 1


def test_cancel_of_an_adopted_driver_escalates_to_its_process_group(
    launcher: Launcher,
    store: st.JobStore,
    spawner: Spawner,
    clock: Clock,
    live: Callable[..., subprocess.Popen[bytes]],
) -> None:
    proc = live(ignore_term=True)
    job_id = _running_on(store, proc)
    launcher.adopt()
    launcher.cancel(job_id)
    clock.t += CANCEL_GRACE_S + 0.1
    launcher.reconcile()  # SIGTERM: ignored
    time.sleep(0.2)
    launcher.reconcile()
    assert store.get(job_id).status == st.JobStatus.RUNNING
    clock.t += KILL_AFTER_S
    launcher.reconcile()  # SIGKILL
    _gone(proc)
    launcher.reconcile()
    assert store.get(job_id).status == st.JobStatus.CANCELLED
    assert spawner.calls == []


def test_a_queued_job_whose_driver_started_before_a_crash_is_adopted_not_doubled(
    launcher: Launcher,
    store: st.JobStore,
    spawner: Spawner,
    live: Callable[..., subprocess.Popen[bytes]],
) -> None:
    proc = live()  # spawned by the last service, not yet claimed
    (job_id,) = _queued(store, 1)
    store.update(job_id, driver_pid=proc.pid, driver_started=process_start(proc.pid))
    launcher.adopt()
    launcher.reconcile()
    assert spawner.calls == []
    assert launcher.procs[job_id].pid == proc.pid


# -- processes and the driver's environment ---------------------------------------


def test_a_process_is_named_by_its_pid_and_start_time() -> None:
    me = process_start(os.getpid())
    assert me is not None
    assert me.isdigit()
    assert same_process(os.getpid(), me)
    assert not same_process(os.getpid(), str(int(me) + 1))
    assert not same_process(os.getpid(), None)
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while process_start(child.pid) is not None:  # a zombie reads as gone
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.wait()
    assert process_start(child.pid) is None
    assert process_start(0) is None
    assert process_start(None) is None


def test_the_driver_gives_up_on_a_dead_ray_head_in_20_s_unless_told_otherwise(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_gcs_rpc_server_reconnect_timeout_s", raising=False)
    env = driver_env(settings)
    assert env["RAY_gcs_rpc_server_reconnect_timeout_s"] == "20"
    assert env["SPARQ_RAY_ADDRESS"] == RAY
    assert env["SPARQ_DATABASE_URL"] == settings.db_url
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "5")
    assert driver_env(settings)["RAY_gcs_rpc_server_reconnect_timeout_s"] == "5"


def test_stop_stops_the_drivers_and_leaves_their_jobs_to_resume(
    launcher: Launcher, store: st.JobStore, spawner: Spawner
) -> None:
    (job_id,) = _queued(store, 1)
    launcher.reconcile()
    store.transition(job_id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING)
    launcher.stop(timeout=0.1)
    assert spawner.drivers[0].signals == ["TERM", "KILL"]
    job = store.get(job_id)
    assert job.status == st.JobStatus.RUNNING  # the next service resumes it
    assert "resumes" in (job.message or "")
    assert launcher.procs == {}


# -- compare-and-set ---------------------------------------------------------------


def _race(job_id: str, cancel: st.JobStore, claim: st.JobStore) -> dict[str, bool]:
    """A cancel (queued -> cancelled) and a claim (queued -> running), released together."""
    barrier = threading.Barrier(2)
    won: dict[str, bool] = {}

    def go(name: str, s: st.JobStore, status: str) -> None:
        barrier.wait()
        won[name] = s.transition(job_id, {st.JobStatus.QUEUED}, status=status)

    threads = [
        threading.Thread(target=go, args=("cancel", cancel, st.JobStatus.CANCELLED)),
        threading.Thread(target=go, args=("claim", claim, st.JobStatus.RUNNING)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_a_cancel_and_a_claim_racing_never_both_win(settings: Settings) -> None:
    """Two stores (two connections, as the service and a driver) on one SQLite file."""
    service, driver = st.JobStore(settings.db_url), st.JobStore(settings.db_url)
    try:
        for _ in range(60):
            job_id = service.create(SPEC).id
            won = _race(job_id, service, driver)
            assert sorted(won.values()) == [False, True], won
            winner = st.JobStatus.CANCELLED if won["cancel"] else st.JobStatus.RUNNING
            assert service.get(job_id).status == winner
    finally:
        service.close()
        driver.close()


def test_a_transition_of_a_job_that_does_not_exist_raises(store: st.JobStore) -> None:
    with pytest.raises(st.JobNotFound):
        store.transition("nope", {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING)
    job_id = _running(store)
    assert not store.transition(job_id, {st.JobStatus.QUEUED}, status=st.JobStatus.CANCELLED)
    assert store.get(job_id).status == st.JobStatus.RUNNING
