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
