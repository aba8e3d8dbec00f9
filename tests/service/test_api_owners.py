"""Jobs belong to the principal who submitted them: another principal's job answers
404 exactly as one that does not exist; admins see everything; the queued-jobs limit
counts one principal's jobs. Without tokens nothing changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import store as st
from service.api import create_app
from service.settings import Settings

MINIMAL: dict[str, Any] = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}
TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789",
    "root": "root-token-0123456789",
}
BARE = "bare-token-0123456789abc"
PATHS = ("", "/trials", "/pareto", "/checkpoint", "/trials/t1/checkpoint")


def _as(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS.get(who, who)}"}


def _client(settings: Settings, **kw: Any) -> TestClient:
    update = {
        "api_tokens": [f"{n}:{t}" for n, t in TOKENS.items()] + [BARE],
        "admin_principals": ["root"],
        **kw,
    }
    app = create_app(settings.model_copy(update=update), launch=False)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with _client(settings) as c:
        yield c


def _store(client: TestClient) -> st.JobStore:
    return client.app.state.store  # type: ignore[attr-defined, no-any-return]


def _with_checkpoints(client: TestClient, job_id: str, tmp_path: Path) -> None:
    """Give a job an exported checkpoint and a trial with one (files that exist)."""
    best, trial = tmp_path / f"{job_id}.sparq", tmp_path / f"{job_id}-t1.sparq"
    best.write_bytes(b"BEST")
    trial.write_bytes(b"TRIAL")
    store = _store(client)
    store.update(job_id, status=st.JobStatus.SUCCEEDED, best_checkpoint=str(best))
    store.upsert_trial(
        job_id, "t1", number=1, status=st.TrialStatus.COMPLETED, checkpoint=str(trial), size_bytes=5
    )


def _ids(client: TestClient, who: str) -> list[str]:
    r = client.get("/v1/jobs", headers=_as(who), params={"limit": 100})
    assert r.status_code == 200
    return [j["id"] for j in r.json()["jobs"]]


def test_a_job_records_its_owner_by_name_never_by_token(client: TestClient) -> None:
    r = client.post("/v1/jobs", json=MINIMAL, headers=_as("alice"))
    assert r.status_code == 201
    assert r.json()["owner"] == "alice"
    assert _store(client).get(r.json()["id"]).owner == "alice"
    assert client.get("/v1/jobs", headers=_as("alice")).json()["jobs"][0]["owner"] == "alice"
    bare = client.post("/v1/jobs", json=MINIMAL, headers=_as(BARE)).json()
    assert bare["owner"].startswith("token-")
    assert BARE not in client.get(f"/v1/jobs/{bare['id']}", headers=_as(BARE)).text


def test_another_principals_job_is_404_exactly_as_an_unknown_one(
    client: TestClient, tmp_path: Path
) -> None:
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=_as("alice")).json()["id"]
    _with_checkpoints(client, job_id, tmp_path)
    for path in PATHS:
        assert client.get(f"/v1/jobs/{job_id}{path}", headers=_as("alice")).status_code == 200
        theirs = client.get(f"/v1/jobs/{job_id}{path}", headers=_as("bob"))
        unknown = client.get(f"/v1/jobs/nope{path}", headers=_as("bob"))
        assert (theirs.status_code, unknown.status_code) == (404, 404), path
        assert theirs.json() == {"message": f"job {job_id!r} does not exist"}, path
        assert theirs.json()["message"] == unknown.json()["message"].replace("nope", job_id)
    assert _ids(client, "bob") == []
    assert _ids(client, "alice") == [job_id]


def test_another_principals_job_cannot_be_cancelled(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=MINIMAL, headers=_as("alice")).json()["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=_as("bob"))
    assert r.status_code == 404
    assert r.json() == client.post("/v1/jobs/nope/cancel", headers=_as("bob")).json() | {
        "message": f"job {job_id!r} does not exist"
    }
    job = _store(client).get(job_id)
    assert (job.status, job.cancel_requested) == (st.JobStatus.QUEUED, False)
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=_as("alice"))
    assert (r.status_code, r.json()["status"]) == (200, "cancelled")


def test_an_admin_sees_and_cancels_every_job(client: TestClient, tmp_path: Path) -> None:
    a = client.post("/v1/jobs", json=MINIMAL, headers=_as("alice")).json()["id"]
    b = client.post("/v1/jobs", json=MINIMAL, headers=_as("bob")).json()["id"]
    _with_checkpoints(client, a, tmp_path)
    before_tokens = _store(client).create({"name": "old", "search": {"trials": 1}}).id
    assert set(_ids(client, "root")) == {a, b, before_tokens}
    assert _ids(client, "alice") == [a]  # a job from before tokens: admins only
    for path in PATHS:
        assert client.get(f"/v1/jobs/{a}{path}", headers=_as("root")).status_code == 200, path
    assert client.get(f"/v1/jobs/{b}", headers=_as("root")).json()["owner"] == "bob"
    r = client.post(f"/v1/jobs/{b}/cancel", headers=_as("root"))
    assert (r.status_code, r.json()["status"]) == (200, "cancelled")
    assert client.get(f"/v1/jobs/{before_tokens}", headers=_as("alice")).status_code == 404


def test_the_queued_jobs_limit_is_per_principal(settings: Settings) -> None:
    with _client(settings, max_queued_jobs=2) as c:
        for _ in range(2):
            assert c.post("/v1/jobs", json=MINIMAL, headers=_as("alice")).status_code == 201
        r = c.post("/v1/jobs", json=MINIMAL, headers=_as("alice"))
        assert r.status_code == 429
        assert r.json()["message"] == (
            "2 jobs of 'alice' are queued, the limit is 2 per principal "
            "(SPARQ_MAX_QUEUED_JOBS); retry when some have started"
        )
        assert c.post("/v1/jobs", json=MINIMAL, headers=_as("bob")).status_code == 201
        assert c.post("/v1/jobs", json=MINIMAL, headers=_as("root")).status_code == 201
        assert len(_ids(c, "root")) == 4  # admins see all, but queue only their own


def test_without_tokens_jobs_have_no_owner_and_everything_is_as_before(
    settings: Settings, tmp_path: Path
) -> None:
    app = create_app(settings.model_copy(update={"max_queued_jobs": 1}), launch=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        job = c.post("/v1/jobs", json=MINIMAL).json()
        assert job["owner"] is None
        _with_checkpoints(c, job["id"], tmp_path)
        for path in PATHS:
            assert c.get(f"/v1/jobs/{job['id']}{path}").status_code == 200, path
        other = _store(c).create({"name": "a", "search": {"trials": 1}}, owner="alice")
        assert {j["id"] for j in c.get("/v1/jobs").json()["jobs"]} == {job["id"], other.id}
        _store(c).update(job["id"], status=st.JobStatus.QUEUED)
        r = c.post("/v1/jobs", json=MINIMAL)
        assert r.status_code == 429
        assert r.json()["message"] == (  # as before: all queued jobs (one user)
            "2 jobs are queued, the limit is 1 (SPARQ_MAX_QUEUED_JOBS); "
            "retry when some have started"
        )
