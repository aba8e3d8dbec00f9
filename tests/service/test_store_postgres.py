"""The job store on a real PostgreSQL server (tests/postgres.py): what the service and
the drivers rely on, where SQLite's single-writer lock no longer hides races."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from service import store as st

pytestmark = pytest.mark.slow  # starts a PostgreSQL server once per session (~3 s)

SPEC = {"name": "pg", "search": {"trials": 4}}


@pytest.fixture
def pg_url(postgres: Any) -> str:
    return str(postgres.createdb(f"t{uuid.uuid4().hex[:12]}"))


def test_jobs_and_trials_round_trip(pg_url: str) -> None:
    store = st.JobStore(pg_url)
    assert store.engine.dialect.name == "postgresql"
    job = store.create({**SPEC, "model": {"builtin": "digits-mlp"}})
    got = store.get(job.id)
    assert (got.status, got.trials_total, got.spec["model"]) == (
        st.JobStatus.QUEUED, 4, {"builtin": "digits-mlp"}
    )  # fmt: skip
    assert got.created_at.tzinfo is not None
    policy = {"layers": {"1": {"bits": 4, "sparsity": 0.5}}}
    store.upsert_trial(job.id, "t1", number=1, status=st.TrialStatus.COMPLETED, policy=policy,
                       accuracy=0.9, size_bytes=1234, bops=5e6, node_id="n" * 56)  # fmt: skip
    store.upsert_trial(job.id, "t1", accuracy=0.95)  # an update, not a second row
    store.upsert_trial(job.id, "t0", number=0, status=st.TrialStatus.FAILED, error="x" * 10_000)
    t0, t1 = store.trials(job.id)
    assert (t0.trial_id, t1.trial_id) == ("t0", "t1")  # by number
    assert (t1.accuracy, t1.size_bytes, t1.policy, t1.node_id) == (0.95, 1234, policy, "n" * 56)
    assert len(t0.error or "") == 10_000
    assert [j.id for j in store.list_jobs(status=st.JobStatus.QUEUED)] == [job.id]
    with pytest.raises(st.JobNotFound):
        store.get("nope")
    store.close()


def test_transition_is_compare_and_set(pg_url: str) -> None:
    store = st.JobStore(pg_url)
    job = store.create(SPEC)
    assert store.transition(
        job.id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING, driver_pid=1
    )
    assert not store.transition(
        job.id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING, driver_pid=2
    )
    assert store.get(job.id).driver_pid == 1
    assert store.transition(job.id, {st.JobStatus.RUNNING}, status=st.JobStatus.SUCCEEDED)
    assert not store.transition(
        job.id, {st.JobStatus.RUNNING, st.JobStatus.QUEUED}, status=st.JobStatus.FAILED
    )
    assert store.get(job.id).status == st.JobStatus.SUCCEEDED
    store.close()


def test_concurrent_transitions_have_exactly_one_winner(pg_url: str) -> None:
    """Threads race to start the same queued jobs (a launcher and relaunched drivers
    would): SELECT ... FOR UPDATE makes each compare-and-set atomic."""
    store = st.JobStore(pg_url)
    jobs = [store.create(SPEC) for _ in range(5)]
    won: list[tuple[str, int]] = []
    barrier = threading.Barrier(8)
    lock = threading.Lock()

    def race(pid: int) -> None:
        mine = st.JobStore(pg_url)  # a connection pool of its own, like another process
        barrier.wait()
        for job in jobs:
            if mine.transition(
                job.id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING, driver_pid=pid
            ):
                with lock:
                    won.append((job.id, pid))
            # and everyone asks for a cancel at once: an update, never lost or failed
            mine.update(job.id, cancel_requested=True)
        mine.close()

    threads = [threading.Thread(target=race, args=(pid,)) for pid in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(j for j, _ in won) == sorted(j.id for j in jobs)  # one winner per job
    for job_id, pid in won:
        row = store.get(job_id)
        assert (row.status, row.driver_pid, row.cancel_requested) == (
            st.JobStatus.RUNNING,
            pid,
            True,
        )
    store.close()


def test_an_old_store_gains_the_added_columns_in_place(pg_url: str) -> None:
    added = {(t, c) for t, c in st._ADDED_COLUMNS}
    old = sa.MetaData()
    for model in (st.Job, st.Trial):
        table = model.__table__  # type: ignore[attr-defined]
        cols = [c.copy() for c in table.columns if (table.name, c.name) not in added]
        sa.Table(table.name, old, *cols)
    engine = sa.create_engine(pg_url)
    old.create_all(engine)
    with engine.begin() as conn:  # a job an older sparq wrote
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, name, spec, status, created_at, cancel_requested,"
                " trials_total, trials_completed, trials_failed, front_size)"
                " VALUES ('old', 'old', '{}', 'succeeded', now(), false, 1, 1, 0, 1)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO trials (job_id, trial_id, number, status)"
                " VALUES ('old', 't1', 1, 'completed')"
            )
        )
    engine.dispose()

    store = st.JobStore(pg_url)
    cols = {
        t: {c["name"] for c in sa.inspect(store.engine).get_columns(t)} for t in ("jobs", "trials")
    }
    assert all(c in cols[t] for t, c in added)
    job = store.get("old")
    assert (job.restarts, job.trials_stopped) == (0, 0)  # old rows get the defaults
    (trial,) = store.trials("old")
    assert (trial.bops, trial.relative_bops, trial.node_id) == (None, None, None)
    store.upsert_trial("old", "t1", bops=1.0, node_id="abc")
    assert store.trial("old", "t1").node_id == "abc"
    st.JobStore(pg_url).close()  # idempotent: a second start adds nothing
    store.close()


def test_the_password_of_the_store_url_is_hidden_from_what_it_writes(pg_url: str) -> None:
    # trust authentication: the server ignores the password, the store must hide it
    url = pg_url.replace("://sparq@", "://sparq:pg%2Fsecret-0123@")
    assert url != pg_url
    store = st.JobStore(url)
    job = store.create(SPEC)
    store.update(job.id, error=f"could not connect to {url} (pg/secret-0123)")
    error = store.get(job.id).error or ""
    assert "secret-0123" not in error
    assert error.count("***") == 2
    store.close()
