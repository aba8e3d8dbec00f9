"""Trials carry BOPs; an older store gains the columns in place."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from service import store as st


def test_an_old_trials_table_gains_the_bops_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    sa.Table("jobs", old, *[c.copy() for c in st.Job.__table__.columns])  # type: ignore[attr-defined]
    keep = [c.copy() for c in st.Trial.__table__.columns if "bops" not in c.name]  # type: ignore[attr-defined]
    sa.Table("trials", old, *keep)
    engine = sa.create_engine(url)
    old.create_all(engine)
    engine.dispose()

    store = st.JobStore(url)
    job = store.create({"name": "new", "search": {"trials": 1}})
    store.upsert_trial(job.id, "t1", number=1, status="completed", bops=123.0, relative_bops=0.25)
    (trial,) = store.trials(job.id)
    assert (trial.bops, trial.relative_bops) == (123.0, 0.25)
