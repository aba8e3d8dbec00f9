"""The job store: upgrading an older database in place."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from service import store as st


def test_a_store_without_newer_columns_is_upgraded_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    new = set(st._ADDED_COLUMNS) & {("jobs", c.name) for c in st.Job.__table__.columns}
    cols = [c.copy() for c in st.Job.__table__.columns if ("jobs", c.name) not in new]  # type: ignore[attr-defined]
    sa.Table("jobs", old, *cols)
    engine = sa.create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, name, spec, status, created_at, cancel_requested, "
                "trials_total, trials_completed, trials_failed, front_size) VALUES "
                "('j1', 'old', '{}', 'succeeded', '2026-01-01 00:00:00', 0, 1, 1, 0, 1)"
            )
        )
    engine.dispose()

    store = st.JobStore(url)

    assert store.get("j1").restarts == 0
    job = store.create({"name": "new", "search": {"trials": 3}})
    store.update(job.id, restarts=2)
    assert store.get(job.id).restarts == 2


def test_an_old_store_gains_the_driver_identity_and_warnings_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the jobs table as it was before these columns
        conn.execute(
            sa.text(
                "CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, name VARCHAR(100), spec JSON, "
                "status VARCHAR(16), created_at DATETIME, started_at DATETIME, "
                "finished_at DATETIME, cancel_requested BOOLEAN, driver_pid INTEGER, "
                "restarts INTEGER NOT NULL DEFAULT 0, error TEXT, message TEXT, "
                "trials_total INTEGER, trials_completed INTEGER, trials_failed INTEGER, "
                "trials_stopped INTEGER NOT NULL DEFAULT 0, baseline_accuracy FLOAT, "
                "baseline_loss FLOAT, baseline_size_bytes INTEGER, front_size INTEGER, "
                "hypervolume FLOAT, best_trial_id VARCHAR(64), best_accuracy FLOAT, "
                "best_size_bytes INTEGER, best_checkpoint TEXT, "
                "mlflow_experiment_id VARCHAR(64), mlflow_run_id VARCHAR(64))"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, name, spec, status, created_at, cancel_requested, "
                "driver_pid, trials_total, trials_completed, trials_failed, front_size) "
                "VALUES ('j1', 'old', '{}', 'running', '2026-01-01 00:00:00', 0, 4242, 1, 0, 0, 0)"
            )
        )
    engine.dispose()

    store = st.JobStore(url)

    old = store.get("j1")
    assert (old.driver_pid, old.driver_started, old.driver_ray_address) == (4242, None, None)
    assert old.warnings == []
    assert store.transition(
        "j1", {st.JobStatus.RUNNING}, driver_started="123", warnings=["slow disk"]
    )
    again = store.get("j1")
    assert (again.driver_started, again.warnings) == ("123", ["slow disk"])
    assert store.create({"name": "new", "search": {"trials": 1}}).warnings == []
    store.close()


def test_an_old_store_gains_the_owner_column_and_filters_by_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    sa.Table("jobs", old, *[c.copy() for c in st.Job.__table__.columns if c.name != "owner"])  # type: ignore[attr-defined]
    engine = sa.create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, name, spec, status, created_at, cancel_requested, "
                "restarts, trials_total, trials_completed, trials_failed, trials_stopped, "
                "front_size, warnings, mlflow_synced) VALUES ('j1', 'old', '{}', 'queued', "
                "'2026-01-01 00:00:00', 0, 0, 1, 0, 0, 0, 0, '[]', 0)"
            )
        )
    engine.dispose()

    store = st.JobStore(url)

    assert store.get("j1").owner is None  # from before tokens named principals
    mine = store.create({"name": "new", "search": {"trials": 1}}, owner="alice")
    assert store.get(mine.id).owner == "alice"
    assert [j.id for j in store.page(None, 10, owner="alice")] == [mine.id]
    assert {j.id for j in store.page(None, 10)} == {"j1", mine.id}
    assert (store.count(st.JobStatus.QUEUED, owner="alice"), store.count(st.JobStatus.QUEUED)) == (
        1,
        2,
    )
    assert store.count(owner="bob") == 0
    store.close()
