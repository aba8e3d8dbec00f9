"""The launcher starts one driver per queued job, even when a pass runs before the
driver it started has claimed the job (flipped it to running)."""

from __future__ import annotations

import pytest

from service import store as st
from service.launcher import Launcher
from service.settings import Settings


class _Running:
    pid = 1
    returncode = None

    def poll(self) -> None:
        return None


def test_a_queued_job_gets_one_driver_until_it_claims_the_job(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.max_running_jobs = 2
    store = st.JobStore(settings.db_url)
    launcher = Launcher(settings, store)
    spawned: list[str] = []

    def spawn(job_id: str, *, resume: bool = False) -> None:
        spawned.append(job_id)
        launcher.procs[job_id] = _Running()  # type: ignore[assignment]

    monkeypatch.setattr(launcher, "_spawn", spawn)
    a = store.create({"name": "a", "search": {"trials": 1}})
    launcher.reconcile()
    launcher.reconcile()  # the driver has not claimed job a yet: it is still queued
    assert spawned == [a.id]
    b = store.create({"name": "b", "search": {"trials": 1}})
    launcher.reconcile()
    assert spawned == [a.id, b.id]
    store.close()
