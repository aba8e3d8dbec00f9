"""Submit refuses a spec naming code the operator has not allowed: 422 naming the
field, the module and the setting; allowed code is accepted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings

DIGITS = {"builtin": "digits"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, launch=False), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    ("field", "source"),
    [
        ("model", {"entrypoint": "subprocess:run", "kwargs": {"args": "id > /tmp/x"}}),
        ("model", {"entrypoint": "os:system", "kwargs": {"command": "id"}}),
        ("model", {"entrypoint": "builtins:exec"}),
        ("model", {"entrypoint": "shutil:rmtree"}),
        ("dataset", {"entrypoint": "numpy:loadtxt", "kwargs": {"fname": "/proc/self/environ"}}),
    ],
)
def test_code_not_allowed_is_refused_at_submit(
    client: TestClient, field: str, source: dict
) -> None:
    spec = {"model": {"builtin": "digits-mlp"}, "dataset": DIGITS, field: source}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    body = r.json()
    [detail] = body["detail"]
    module = source["entrypoint"].partition(":")[0]
    assert detail["field"] == f"{field}.entrypoint"
    assert detail["value"] == source["entrypoint"]
    assert f"module {module!r}" in detail["rule"]
    assert "SPARQ_ENTRYPOINT_MODULES" in detail["rule"] or "never allowed" in detail["rule"]
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing half-written


def test_a_module_outside_the_setting_is_refused_and_the_setting_named(
    settings: Settings,
) -> None:
    closed = settings.model_copy(update={"entrypoint_modules": []})
    with TestClient(create_app(closed, launch=False), raise_server_exceptions=False) as c:
        spec = {"model": {"entrypoint": "tests.nets:residual_cnn"}, "dataset": DIGITS}
        r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    assert "SPARQ_ENTRYPOINT_MODULES is empty" in r.json()["message"]
    assert "adding 'tests.nets'" in r.json()["message"]


def test_allowed_code_is_accepted(client: TestClient) -> None:
    spec = {"model": {"entrypoint": "tests.nets:residual_cnn"}, "dataset": DIGITS}
    assert client.post("/v1/jobs", json=spec).status_code == 201
