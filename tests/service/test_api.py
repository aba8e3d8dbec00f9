"""The REST surface over a real job store, without starting search drivers."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import store as st
from service.api import create_app
from service.settings import Settings

MINIMAL = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, launch=False), raise_server_exceptions=False) as c:
        yield c


def test_health(client: TestClient) -> None:
    r = client.get("/v1/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_create_get_list_job(client: TestClient) -> None:
    r = client.post("/v1/jobs", json={**MINIMAL, "search": {"trials": 3}})
    assert r.status_code == 201
    job = r.json()
    assert job["status"] == "queued"
    assert job["trials_total"] == 3
    assert job["warnings"] == []
    assert job["spec"]["search_space"]["weight_bits"] == [2, 3, 4, 5, 6, 8]
    for key in ("trials_completed", "trials_failed", "baseline", "best", "mlflow", "error"):
        assert key in job
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    page = client.get("/v1/jobs").json()
    assert [j["id"] for j in page["jobs"]] == [job["id"]]
    assert page["next_cursor"] is None
    assert "spec" not in page["jobs"][0]  # a summary; GET /v1/jobs/{id} has the spec
    assert client.get("/v1/jobs", params={"status": "running"}).json()["jobs"] == []
    assert client.get(f"/v1/jobs/{job['id']}/trials").json() == []
    pareto = client.get(f"/v1/jobs/{job['id']}/pareto").json()
    assert pareto["points"] == []


def test_a_job_shows_the_warnings_its_driver_recorded(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=MINIMAL).json()["id"]
    store: st.JobStore = client.app.state.store  # type: ignore[attr-defined]
    store.update(job_id, warnings=["the dataset has 3 classes; the model has 10 outputs"])
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert view["warnings"] == ["the dataset has 3 classes; the model has 10 outputs"]


def test_a_job_says_which_layers_the_engine_handles_otherwise_and_why(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=MINIMAL).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["layers_adjusted"] == {}  # before set-up
    store: st.JobStore = client.app.state.store  # type: ignore[attr-defined]
    dense = {"fc": "its channels reach the network's output"}
    adjusted = {"excite": "noise_block 4 does not divide its input size 6: blocks of 3"}
    store.update(job_id, layers_left_dense=dense, layers_adjusted=adjusted)
    view = client.get(f"/v1/jobs/{job_id}").json()
    assert (view["layers_left_dense"], view["layers_adjusted"]) == (dense, adjusted)


def test_invalid_spec_is_422_naming_field_value_and_rule(client: TestClient) -> None:
    r = client.post("/v1/jobs", json={**MINIMAL, "search": {"trials": 0}})
    assert r.status_code == 422
    body = r.json()
    assert body["detail"] == [
        {"field": "search.trials", "value": 0, "rule": "Input should be greater than or equal to 1"}
    ]
    assert "search.trials=0" in body["message"]
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing half-written


def test_warm_start_weights_must_be_a_readable_file(settings: Settings, tmp_path: Path) -> None:
    app = create_app(settings.model_copy(update={"weights_dirs": [tmp_path]}), launch=False)
    client = TestClient(app, raise_server_exceptions=False)
    missing = str(tmp_path / "nope.pt")
    r = client.post("/v1/jobs", json={**MINIMAL, "baseline": {"weights": missing}})
    assert r.status_code == 422
    [d] = r.json()["detail"]
    assert d["field"] == "baseline.weights"
    assert d["value"] == missing
    assert "no readable file" in d["rule"]
    r = client.post("/v1/jobs", json={**MINIMAL, "baseline": {"weights": "w.pt"}})
    assert r.status_code == 422
    assert "absolute path" in r.json()["detail"][0]["rule"]
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing half-written
    present = tmp_path / "w.pt"
    present.write_bytes(b"x")  # read by the baseline task, not here
    r = client.post("/v1/jobs", json={**MINIMAL, "baseline": {"weights": str(present)}})
    assert r.status_code == 201


def test_malformed_json_is_422_not_500(client: TestClient) -> None:
    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_unknown_job_is_404(client: TestClient) -> None:
    for path in ("", "/trials", "/pareto", "/checkpoint", "/trials/x/checkpoint"):
        r = client.get(f"/v1/jobs/nope{path}")
        assert r.status_code == 404, path
        assert "nope" in r.json()["message"]
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_checkpoint_before_it_exists_is_409(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=MINIMAL).json()
    r = client.get(f"/v1/jobs/{job['id']}/checkpoint")
    assert r.status_code == 409
    assert "no checkpoint yet" in r.json()["message"]


def test_cancel_queued_job(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=MINIMAL).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_bad_query_params_are_422_naming_them(client: TestClient) -> None:
    for params, field in [
        ({"status": "exploded"}, "query.status"),
        ({"limit": 0}, "query.limit"),
        ({"limit": 101}, "query.limit"),
        ({"limit": "many"}, "query.limit"),
    ]:
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 422, params
        assert r.json()["detail"][0]["field"] == field
        assert r.json()["detail"][0]["value"] == str(next(iter(params.values())))


def test_random_bodies_never_produce_a_500(client: TestClient) -> None:
    rng = random.Random(0)
    leaves = [None, 0, -1, 1.5, "x", "", [], {}, True, 10**30, "digits", {"builtin": "digits"}]
    keys = [
        "model",
        "dataset",
        "search",
        "trials",
        "builtin",
        "entrypoint",
        "kwargs",
        "sparsity",
        "search_space",
        "low",
        "high",
        "resources",
        "gpus",
        "export",
        "objectives",
        "name",
    ]

    def body(depth: int) -> object:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(leaves)
        return {rng.choice(keys): body(depth - 1) for _ in range(rng.randint(0, 4))}

    for _ in range(200):
        payload = body(4)
        r = client.post("/v1/jobs", content=json.dumps(payload))
        assert r.status_code in (201, 422), (payload, r.text)


def test_bearer_tokens(settings: Settings) -> None:
    token = "t0ken-for-tests-0123456789"
    secured = settings.model_copy(update={"api_tokens": [token]})
    with TestClient(create_app(secured, launch=False)) as c:
        assert c.get("/v1/health").status_code == 200
        assert c.get("/v1/jobs").status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert c.post("/v1/jobs", json=MINIMAL, headers=bad).status_code == 401
        good = {"Authorization": f"Bearer {token}"}
        assert c.post("/v1/jobs", json=MINIMAL, headers=good).status_code == 201


def test_short_tokens_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARQ_API_TOKENS", "changeme")
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings()


def test_job_view_shows_measurements(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json=MINIMAL).json()
    store = st.JobStore(settings.db_url)
    store.update(
        job["id"], status=st.JobStatus.RUNNING, baseline_accuracy=0.97, baseline_size_bytes=1000
    )
    store.upsert_trial(
        job["id"],
        "t1",
        number=1,
        status=st.TrialStatus.COMPLETED,
        accuracy=0.96,
        size_bytes=100,
        policy={"layers": {"0": {"bits": 4, "sparsity": 0.5}}},
    )
    store.upsert_trial(
        job["id"],
        "t2",
        number=2,
        status=st.TrialStatus.COMPLETED,
        accuracy=0.95,
        size_bytes=200,
        policy={"layers": {}},
    )
    store.upsert_trial(job["id"], "t3", number=3, status=st.TrialStatus.FAILED, error="boom")
    view = client.get(f"/v1/jobs/{job['id']}").json()
    assert view["baseline"] == {"accuracy": 0.97, "size_bytes": 1000}
    pareto = client.get(f"/v1/jobs/{job['id']}/pareto").json()
    assert [p["trial_id"] for p in pareto["points"]] == ["t1"]
    assert pareto["points"][0]["policy"]["layers"]["0"]["bits"] == 4
    assert pareto["points"][0]["compression"] == 10.0
    trials = client.get(f"/v1/jobs/{job['id']}/trials").json()
    assert [t["status"] for t in trials] == ["completed", "completed", "failed"]
    assert trials[2]["error"] == "boom"
