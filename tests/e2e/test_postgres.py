"""The stack on PostgreSQL: the job store (SPARQ_DATABASE_URL) and MLflow's backend
(SPARQ_MLFLOW_BACKEND_URI) in two databases of one throwaway server
(tests/postgres.py), two jobs at once, one of them cancelled."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.e2e.test_stack import SMALL, sparq_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_concurrent_jobs_and_a_cancel_on_postgres(postgres: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    jobs_url, mlflow_url = postgres.createdb("sparq_jobs"), postgres.createdb("sparq_mlflow")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "SPARQ_DATABASE_URL": jobs_url,
        "SPARQ_MLFLOW_BACKEND_URI": mlflow_url,
        "SPARQ_MAX_RUNNING_JOBS": "2",
    }
    short = {**SMALL, "name": "short", "search": {"trials": 4, "concurrency": 1, "seed": 1}}
    long = {**SMALL, "name": "long", "constraints": {"max_accuracy_drop": None},
            "search": {"trials": 40, "concurrency": 1, "seed": 2}}  # fmt: skip
    with sparq_up(home, **env) as stack:
        a, b = stack.post(short)["id"], stack.post(long)["id"]
        deadline = time.monotonic() + 240
        while True:  # both drivers run at once
            ja, jb = stack.job(a), stack.job(b)
            if ja["status"] == jb["status"] == "running":
                break
            assert time.monotonic() < deadline, (ja["status"], jb["status"])
            time.sleep(0.5)
        while stack.job(b)["trials_completed"] < 1:
            assert time.monotonic() < deadline, "no trial of the long job finished"
            time.sleep(0.5)
        r = httpx.post(f"{stack.api}/v1/jobs/{b}/cancel", timeout=30)
        assert r.status_code == 200, r.text
        jb = stack.wait(b, timeout=120)
        ja = stack.wait(a, timeout=300)
        assert ja["status"] == "succeeded", ja["error"]
        rows_a = httpx.get(f"{stack.api}/v1/jobs/{a}/trials", timeout=30).json()
        seen = [(t["trial_id"], t["number"], t["status"]) for t in rows_a]
        assert (ja["trials_completed"], ja["trials_failed"], ja["restarts"]) == (4, 0, 0), seen
        assert jb["status"] == "cancelled", jb
        assert 1 <= jb["trials_completed"] < 40
        assert jb["best"] is not None  # the best of what finished was exported
        for job in (ja, jb):
            r = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/checkpoint", timeout=30)
            assert r.status_code == 200
            assert len(r.content) == job["best"]["size_bytes"]

        client = MlflowClient(stack.mlflow)
        for job in (ja, jb):
            runs = client.search_runs(
                [job["mlflow"]["experiment_id"]],
                filter_string=f"tags.mlflow.parentRunId = '{job['mlflow']['run_id']}'",
            )
            done = [r for r in runs if r.info.status == "FINISHED"]
            assert len(done) == job["trials_completed"]

    # everything is in PostgreSQL, nothing in SQLite files under SPARQ_HOME
    assert not (home / "sparq.db").exists()
    assert not (home / "mlflow" / "mlflow.db").exists()
    jobs_db, mlflow_db = sa.create_engine(jobs_url), sa.create_engine(mlflow_url)
    with jobs_db.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, status FROM jobs")).all())
        trials = conn.execute(sa.text("SELECT count(*) FROM trials")).scalar_one()
    assert rows == {a: "succeeded", b: "cancelled"}
    assert trials >= 4 + jb["trials_completed"]
    with mlflow_db.connect() as conn:
        names = set(conn.execute(sa.text("SELECT name FROM experiments")).scalars())
        runs_n = conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    assert {"sparq/short", "sparq/long"} <= names
    assert runs_n >= 2 + 4 + jb["trials_completed"]  # parent runs and trial runs
    jobs_db.dispose()
    mlflow_db.dispose()
