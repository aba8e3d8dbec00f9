"""One root exception, one table from domain errors to statuses, and the status enums
as the API shows them."""

from __future__ import annotations

import builtins
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import store as st
from service import weights as wt
from service.api import ERROR_STATUS, INTERNAL_ERROR, _status_for, create_app
from service.client import ClientError
from service.schemas import JobView, TrialView
from service.settings import Settings
from service.stack import StackError
from workers import entrypoints
from workers.errors import (
    CheckpointError,
    Conflict,
    Invalid,
    NotFound,
    SparqError,
    SpecError,
    TooLarge,
    TooMany,
    Unauthorized,
)

MINIMAL = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, launch=False)

    def raise_(exc: BaseException) -> Any:
        def route() -> None:
            raise exc

        return route

    app.add_api_route("/boom/key", raise_(KeyError("/secret/path/of/the/server")))
    app.add_api_route("/boom/lookup", raise_(LookupError("no such thing")))
    app.add_api_route("/boom/value", raise_(ValueError("bad")))
    app.add_api_route("/boom/spec", raise_(SpecError("a worker's error")))
    app.add_api_route("/boom/not-found", raise_(NotFound("no such widget")))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (NotFound("x"), 404),
        (st.JobNotFound("j"), 404),
        (st.TrialNotFound("j", "t"), 404),
        (Unauthorized("x"), 401),
        (Conflict("x"), 409),
        (Invalid("a.b", 1, "must be 2"), 422),
        (entrypoints.NotAllowed("model.entrypoint", "os:system", "never"), 422),
        (TooMany("x"), 429),
        (TooLarge(10, "SPARQ_MAX_REQUEST_BYTES"), 413),
        # sparq's own errors that no route raises: reaching a handler is a bug
        (SpecError("x"), 500),
        (CheckpointError("x"), 500),
        (wt.Refused("x"), 500),  # create_job answers it as a 422 of baseline.weights
        (StackError("x"), 500),
        (ClientError(404, "x"), 500),
        # builtins never mean a status: a KeyError in a handler is not a 404
        (KeyError("x"), 500),
        (LookupError("x"), 500),
        (ValueError("x"), 500),
        (RuntimeError("x"), 500),
    ],
)
def test_each_error_has_its_status(exc: Exception, status: int) -> None:
    assert _status_for(exc) == status


def test_the_table_maps_only_sparq_errors() -> None:
    builtin_types = {v for v in vars(builtins).values() if isinstance(v, type)}
    for cls in ERROR_STATUS:
        assert issubclass(cls, SparqError), cls
        assert cls not in builtin_types, cls
        assert cls.__module__ != "builtins", cls
    for cls in (SpecError, CheckpointError, wt.Refused, StackError, ClientError, st.JobNotFound):
        assert issubclass(cls, SparqError), cls


@pytest.mark.parametrize(
    "exc",
    [
        Invalid("a.b", [1], "must be 2"),
        entrypoints.NotAllowed("model.entrypoint", "os:system", "never"),
        TooLarge(10, "SPARQ_MAX_WEIGHTS_BYTES"),
        st.JobNotFound("j"),
        st.TrialNotFound("j", "t"),
        ClientError(429, "HTTP 429: later"),
        SpecError("x"),
    ],
)
def test_errors_pickle(exc: Exception) -> None:  # they cross Ray process boundaries
    again = pickle.loads(pickle.dumps(exc))
    assert (type(again), str(again), vars(again)) == (type(exc), str(exc), vars(exc))


@pytest.mark.parametrize("path", ["/boom/key", "/boom/lookup", "/boom/value", "/boom/spec"])
def test_an_unexpected_error_is_a_500_that_tells_nothing(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 500
    assert r.json() == {"message": INTERNAL_ERROR}
    assert "secret" not in r.text
    assert "bad" not in r.text


def test_a_domain_error_is_answered_by_the_table(client: TestClient) -> None:
    r = client.get("/boom/not-found")
    assert (r.status_code, r.json()) == (404, {"message": "no such widget"})


def test_unknown_trial_is_404(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json=MINIMAL).json()["id"]
    store: st.JobStore = client.app.state.store  # type: ignore[attr-defined]
    with pytest.raises(st.TrialNotFound):
        store.trial(job_id, "nope")
    r = client.get(f"/v1/jobs/{job_id}/trials/nope/checkpoint")
    assert r.status_code == 404
    assert r.json() == {"message": f"job {job_id!r} has no trial 'nope'"}


def test_statuses_are_enums_shown_as_their_strings(client: TestClient) -> None:
    assert [str(s) for s in st.JobStatus] == [
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    ]
    assert [str(s) for s in st.TrialStatus] == ["completed", "failed", "stopped"]
    assert st.TERMINAL == {"succeeded", "failed", "cancelled"}  # equal to stored strings
    job_id = client.post("/v1/jobs", json=MINIMAL).json()["id"]
    store: st.JobStore = client.app.state.store  # type: ignore[attr-defined]
    store.update(job_id, status="running")  # as an older sparq wrote it
    store.upsert_trial(job_id, "t1", number=1, status=st.TrialStatus.STOPPED)
    job = store.get(job_id)
    view = JobView.of(job, "http://mlflow", hide=str)
    assert view.status is st.JobStatus.RUNNING
    assert view.model_dump(mode="json")["status"] == "running"
    trial = TrialView.of(store.trial(job_id, "t1"), hide=str)
    assert '"status":"stopped"' in trial.model_dump_json()
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    assert client.get(f"/v1/jobs/{job_id}/trials").json()[0]["status"] == "stopped"
    assert client.get(f"/v1/jobs/{job_id}/pareto").json()["status"] == "running"
    listed = client.get("/v1/jobs", params={"status": st.JobStatus.RUNNING}).json()["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    assert client.get("/v1/jobs", params={"status": "paused"}).status_code == 422


def test_openapi_lists_the_status_values(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def enum_of(schema: dict[str, Any]) -> list[str]:
        for option in schema.get("anyOf", [schema]):
            if "$ref" in option:
                return list(schemas[option["$ref"].rsplit("/", 1)[-1]]["enum"])
        raise AssertionError(f"no enum in {schema}")

    (param,) = [p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "status"]
    job_statuses = ["queued", "running", "succeeded", "failed", "cancelled"]
    assert enum_of(param["schema"]) == job_statuses
    assert enum_of(schemas["JobSummary"]["properties"]["status"]) == job_statuses
    trial_statuses = enum_of(schemas["TrialView"]["properties"]["status"])
    assert trial_statuses == ["completed", "failed", "stopped"]
