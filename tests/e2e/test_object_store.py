"""MLflow's artifacts on an S3-compatible object store, as docker/compose.yaml runs
them (MinIO there): `sparq up` with SPARQ_MLFLOW_ARTIFACTS_DESTINATION=s3://... and the
server's S3 endpoint and keys in its environment, against moto's S3 server (PyPI, no
docker). Drivers and trials only talk HTTP to the MLflow server (proxied artifacts),
so they need no credentials. Skipped where moto or boto3 is not installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.stack import free_port, wait_http
from tests.e2e.test_stack import SMALL, sparq_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUCKET = "sparq-mlflow"
KEYS = {"AWS_ACCESS_KEY_ID": "sparq-test", "AWS_SECRET_ACCESS_KEY": "sparq-test-secret"}


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


def _keys() -> dict[str, str]:
    return {k.lower(): v for k, v in KEYS.items()}


def test_artifacts_go_to_the_object_store(s3: str, tmp_path: Path) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    home.mkdir()
    env = {
        "SPARQ_MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_DEFAULT_REGION": "us-east-1",
        **KEYS,
    }
    spec = {**SMALL, "search": {"trials": 2, "concurrency": 2, "seed": 1}}
    with sparq_up(home, **env) as stack:
        job = stack.wait(stack.post(spec)["id"], timeout=300)
        assert job["status"] == "succeeded", job["error"]
        client = MlflowClient(stack.mlflow)
        parent = job["mlflow"]["run_id"]
        assert {"pareto/front.json"} <= {a.path for a in client.list_artifacts(parent, "pareto")}
        trials = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/trials", timeout=30).json()
        run_ids = {t["mlflow_run_id"] for t in trials if t["status"] == "completed"}
        for run_id in run_ids:  # read back over HTTP, through the server, from S3
            got = client.download_artifacts(run_id, "model.sparq", str(tmp_path))
            assert Path(got).stat().st_size > 0

    keys = [
        o["Key"]
        for page in boto3.client("s3", endpoint_url=s3, region_name="us-east-1", **_keys())
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith(f"{parent}/artifacts/pareto/front.json") for k in keys), keys
    for run_id in run_ids:
        assert any(k.endswith(f"{run_id}/artifacts/model.sparq") for k in keys), keys
    local = home / "mlflow" / "artifacts"
    assert not local.exists() or not any(local.rglob("*.sparq"))  # nothing stored locally
