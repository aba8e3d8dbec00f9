"""The stack as docker/compose.yaml runs it, without docker: the job store
(SPARQ_DATABASE_URL) and MLflow's backend (SPARQ_MLFLOW_BACKEND_URI) in two databases
of one throwaway PostgreSQL server (tests/postgres.py), and MLflow's artifacts in an
S3 bucket (SPARQ_MLFLOW_ARTIFACTS_DESTINATION=s3://..., moto's S3 server from PyPI
where compose has MinIO; the server's endpoint and keys in its environment only).
Two jobs at once, one of them cancelled: nothing in SQLite, nothing stored locally,
every trial's checkpoint read back over HTTP through the server from the bucket.

One stack for both concerns, as in production (it was two stacks and three jobs).
Drivers and trials only talk HTTP to the MLflow server (proxied artifacts), so they
need no object-store credentials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.stack import free_port, wait_http
from tests.e2e.test_stack import SMALL, sparq_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUCKET = "sparq-mlflow"
KEYS = {"AWS_ACCESS_KEY_ID": "sparq-test", "AWS_SECRET_ACCESS_KEY": "sparq-test-secret"}


def _keys() -> dict[str, str]:
    return {k.lower(): v for k, v in KEYS.items()}


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port, with the bucket made; its URL."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import boto3

    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/moto-api/", timeout=60, proc=proc)
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", **_keys()).create_bucket(
            Bucket=BUCKET
        )
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_two_concurrent_jobs_and_a_cancel_on_postgres_with_artifacts_on_s3(
    postgres: Any, s3: str, tmp_path: Path
) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    jobs_url, mlflow_url = postgres.createdb("sparq_jobs"), postgres.createdb("sparq_mlflow")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "SPARQ_DATABASE_URL": jobs_url,
        "SPARQ_MLFLOW_BACKEND_URI": mlflow_url,
        "SPARQ_MAX_RUNNING_JOBS": "2",
        "SPARQ_MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_DEFAULT_REGION": "us-east-1",
        **KEYS,
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
        parents, run_ids = [], set()
        for job in (ja, jb):
            parent = job["mlflow"]["run_id"]
            parents.append(parent)
            runs = client.search_runs(
                [job["mlflow"]["experiment_id"]],
                filter_string=f"tags.mlflow.parentRunId = '{parent}'",
            )
            done = [r for r in runs if r.info.status == "FINISHED"]
            assert len(done) == job["trials_completed"]
            pareto = {a.path for a in client.list_artifacts(parent, "pareto")}
            assert {"pareto/front.json"} <= pareto
            trials = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/trials", timeout=30).json()
            run_ids |= {t["mlflow_run_id"] for t in trials if t["status"] == "completed"}
        for run_id in run_ids:  # read back over HTTP, through the server, from S3
            got = client.download_artifacts(run_id, "model.sparq", str(tmp_path))
            assert Path(got).stat().st_size > 0

    # everything is in PostgreSQL, nothing in SQLite files under SPARQ_HOME
    assert not (home / "sparq.db").exists()
    assert not (home / "mlflow" / "mlflow.db").exists()
    jobs_db, mlflow_db = sa.create_engine(jobs_url), sa.create_engine(mlflow_url)
    with jobs_db.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, status FROM jobs")).all())
        trials_n = conn.execute(sa.text("SELECT count(*) FROM trials")).scalar_one()
    assert rows == {a: "succeeded", b: "cancelled"}
    assert trials_n >= 4 + jb["trials_completed"]
    with mlflow_db.connect() as conn:
        names = set(conn.execute(sa.text("SELECT name FROM experiments")).scalars())
        runs_n = conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    assert {"sparq/short", "sparq/long"} <= names
    assert runs_n >= 2 + 4 + jb["trials_completed"]  # parent runs and trial runs
    jobs_db.dispose()
    mlflow_db.dispose()

    # every artifact is in the bucket, none under SPARQ_HOME
    keys = [
        o["Key"]
        for page in boto3.client("s3", endpoint_url=s3, region_name="us-east-1", **_keys())
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    for parent in parents:
        assert any(k.endswith(f"{parent}/artifacts/pareto/front.json") for k in keys), keys
    for run_id in run_ids:
        assert any(k.endswith(f"{run_id}/artifacts/model.sparq") for k in keys), keys
    local = home / "mlflow" / "artifacts"
    assert not local.exists() or not any(local.rglob("*.sparq"))  # nothing stored locally
