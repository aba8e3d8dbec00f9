"""Trials record the Ray node they ran on; an older store gains the column in place."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from service import schemas
from service import store as st


def test_an_old_trials_table_gains_the_node_id_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.MetaData()
    sa.Table("jobs", old, *[c.copy() for c in st.Job.__table__.columns])  # type: ignore[attr-defined]
    keep = [c.copy() for c in st.Trial.__table__.columns if c.name != "node_id"]  # type: ignore[attr-defined]
    sa.Table("trials", old, *keep)
    engine = sa.create_engine(url)
    old.create_all(engine)
    engine.dispose()

    store = st.JobStore(url)
    job = store.create({"name": "new", "search": {"trials": 2}})
    store.upsert_trial(job.id, "t1", number=1, status="completed", node_id="ab" * 28)
    store.upsert_trial(job.id, "t2", number=2, status="failed")
    t1, t2 = store.trials(job.id)
    assert (t1.node_id, t2.node_id) == ("ab" * 28, None)
    assert schemas.TrialView.of(t1, hide=str).node_id == "ab" * 28
    assert schemas.TrialView.of(t2, hide=str).node_id is None
