"""Bounded input on the REST API: body size (413), non-finite numbers and caps on
strings, lists and kwargs (422 naming the field), paginated job listing with a cursor,
and the queued-jobs limit (429)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings

MINIMAL: dict[str, Any] = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}


def _client(settings: Settings, **kw: Any) -> TestClient:
    return TestClient(
        create_app(settings.model_copy(update=kw), launch=False), raise_server_exceptions=False
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with _client(settings) as c:
        yield c


def _post_raw(client: TestClient, body: str) -> Any:
    return client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})


def _jobs(client: TestClient) -> list[dict[str, Any]]:
    return list(client.get("/v1/jobs", params={"limit": 100}).json()["jobs"])


def test_a_body_over_the_limit_is_413_before_parsing(client: TestClient) -> None:
    limit = 1 << 20
    big = '{"model": {"builtin": "digits-mlp", "kwargs": {"x": "' + "a" * limit + '"}}}'
    r = _post_raw(client, big)
    assert r.status_code == 413
    assert r.json()["limit_bytes"] == limit
    assert str(limit) in r.json()["message"]
    assert "SPARQ_MAX_REQUEST_BYTES" in r.json()["message"]
    assert "aaaa" not in r.text  # not echoed back
    # streamed (chunked, no Content-Length): counted as it arrives
    r = client.post(
        "/v1/jobs",
        content=iter([b'{"name": "', b"x" * (limit // 2), b"x" * (limit // 2), b'"}']),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert _jobs(client) == []


def test_the_limit_is_a_setting(settings: Settings) -> None:
    with _client(settings, max_request_bytes=2048) as c:
        spec = {**MINIMAL, "model": {"builtin": "digits-mlp", "kwargs": {"note": "n" * 3000}}}
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 413
        assert r.json()["limit_bytes"] == 2048
        assert c.post("/v1/jobs", json=MINIMAL).status_code == 201


@pytest.mark.parametrize(
    ("body", "field", "value"),
    [
        ('"baseline": {"lr": NaN}', "baseline.lr", "NaN"),
        ('"search": {"time_budget_s": Infinity}', "search.time_budget_s", "Infinity"),
        ('"search": {"time_budget_s": 1e999}', "search.time_budget_s", "1e999"),
        (
            '"search_space": {"sparsity": {"low": -Infinity, "high": 0.5}}',
            "search_space.sparsity.low",
            "-Infinity",
        ),
        ('"constraints": {"max_accuracy_drop": NaN}', "constraints.max_accuracy_drop", "NaN"),
        ('"resources": {"cpus": Infinity}', "resources.cpus", "Infinity"),
    ],
)
def test_non_finite_numbers_are_422_naming_the_field(
    client: TestClient, body: str, field: str, value: str
) -> None:
    r = _post_raw(
        client,
        '{"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}, ' + body + "}",
    )
    assert r.status_code == 422, r.text
    [d] = r.json()["detail"]
    assert d == {"field": field, "value": value, "rule": d["rule"]}
    assert "finite" in d["rule"]
    assert field in r.json()["message"]
    assert _jobs(client) == []


def test_non_finite_numbers_in_kwargs_and_lists_are_named_too(client: TestClient) -> None:
    r = _post_raw(
        client,
        '{"model": {"builtin": "digits-mlp", "kwargs": '
        '{"scale": NaN, "deep": {"x": [1, Infinity]}}}, "dataset": {"builtin": "digits"}}',
    )
    assert r.status_code == 422
    fields = [d["field"] for d in r.json()["detail"]]
    assert fields == ["model.kwargs.deep.x.1", "model.kwargs.scale"]


def test_deeply_nested_json_is_422_not_500(client: TestClient) -> None:
    r = _post_raw(client, "[" * 200_000 + "]" * 200_000)
    assert r.status_code == 422


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"name": "n" * 101}, "name"),
        ({"model": {"entrypoint": "a" * 200 + ":f"}}, "model.entrypoint"),
        (
            {"model": {"builtin": "digits-mlp", "kwargs": {f"k{i}": i for i in range(65)}}},
            "model.kwargs",
        ),
        (
            {"dataset": {"builtin": "digits", "kwargs": {"blob": "x" * (65 << 10)}}},
            "dataset.kwargs",
        ),
        ({"search_space": {"weight_bits": [4] * 257}}, "search_space.weight_bits"),
        ({"search_space": {"sparsity_kinds": ["2:4"] * 257}}, "search_space.sparsity_kinds"),
        ({"search_space": {"method": ["mx"] * 257}}, "search_space.method"),
        ({"objectives": ["accuracy"] * 257}, "objectives"),
        ({"baseline": {"weights": "/" + "w" * 5000 + ".pt"}}, "baseline.weights"),
    ],
)
def test_strings_lists_and_kwargs_are_capped(
    client: TestClient, patch: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/jobs", json={**MINIMAL, **patch})
    assert r.status_code == 422, r.text
    assert field in [d["field"] for d in r.json()["detail"]], r.json()
    assert _jobs(client) == []


def test_job_listing_is_paginated_with_a_cursor(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json=MINIMAL).json()["id"] for _ in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params).json()
        assert len(page["jobs"]) <= 3
        assert all("spec" not in j and "status" in j for j in page["jobs"])
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen))
    assert seen == [j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
    assert len(client.get("/v1/jobs").json()["jobs"]) == 7  # default 20
    assert "spec" in client.get(f"/v1/jobs/{ids[0]}").json()
    assert client.get("/v1/jobs", params={"limit": 101}).status_code == 422
    r = client.get("/v1/jobs", params={"cursor": "not-a-cursor"})
    assert r.status_code == 422
    assert r.json()["detail"] == [
        {"field": "cursor", "value": "not-a-cursor", "rule": "not a cursor this service gave out"}
    ]


def test_queued_jobs_beyond_the_limit_are_429(settings: Settings) -> None:
    with _client(settings, max_queued_jobs=2) as c:
        first = c.post("/v1/jobs", json=MINIMAL).json()
        assert c.post("/v1/jobs", json=MINIMAL).status_code == 201
        r = c.post("/v1/jobs", json=MINIMAL)
        assert r.status_code == 429
        assert "SPARQ_MAX_QUEUED_JOBS" in r.json()["message"]
        c.post(f"/v1/jobs/{first['id']}/cancel")  # no longer queued: room again
        assert c.post("/v1/jobs", json=MINIMAL).status_code == 201
