"""The REST API fuzzed from its own OpenAPI schema (schemathesis), over real HTTP on
loopback: valid and invalid inputs for every operation, with and without a token.

Nothing a client sends may answer 5xx, every answer conforms to the schema the app
publishes, and every 4xx is a JSON body with a ``message`` (422s also say, per
problem, the ``field``, the ``value`` and the ``rule``). The app serves the store
without launching drivers (``launch=False``), so submitted jobs stay queued.
Bounded and deterministic: a fixed number of examples per operation, derandomized.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api import create_app
from service.settings import Settings
from service.stack import free_port

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 50  # per operation and generation mode


class Loopback:
    """The app under uvicorn on a free 127.0.0.1 port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            create_app(settings, launch=False), host="127.0.0.1", port=port, log_level="error"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Loopback:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn stopped"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home: Path = tmp_path_factory.mktemp("fuzz") / "home"
    with Loopback(Settings(home=home, api_tokens=[TOKEN])) as app:
        # a few jobs, so that listing pages and some generated ids reach real rows
        spec = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}
        for name in ("a", "b", "c"):
            r = httpx.post(f"{app.url}/v1/jobs", json={**spec, "name": name}, headers=AUTH)
            assert r.status_code == 201, r.text
        yield app.url


def operations(url: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 10, [op.label for op in ops]  # every route of the API is fuzzed
    return ops


def errors_name_the_problem(response: Any) -> None:
    """A 4xx is JSON with a message; a 422 lists each problem's field, value and rule."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("message"), str), body
    assert body["message"], body
    if response.status_code == 422:
        assert body["detail"], body
        for problem in body["detail"]:
            assert isinstance(problem["field"], str), problem
            assert problem["field"], problem
            assert "value" in problem, problem
            assert isinstance(problem["rule"], str), problem


def fuzz(operation: Any, mode: Any, check: Any) -> bool:
    """``EXAMPLES`` generated requests to one operation, checked; derandomized.
    Returns False when the operation has no invalid request to make (no inputs, or
    only free-form path strings such as a job id)."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        check(case)

    try:
        run()
    except Unsatisfiable:
        if mode != schemathesis.GenerationMode.NEGATIVE:
            raise
        return False
    return True


MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_fuzzed_requests_with_a_token(service: str, mode: Any) -> None:
    """No 5xx, answers as the schema says, 4xx that name the problem."""

    def check(case: Any) -> None:
        # A job spec's cross-field rules (one of builtin/entrypoint is in the schema;
        # low <= high, bit widths a method supports, known presets... are not) refuse
        # many schema-valid specs with a 422 that names them: for that one operation,
        # "schema-valid is accepted" is not a rule; every other check still holds.
        # A cursor is opaque: only one the service gave out is accepted. An upload's
        # body is any bytes to the schema; only a state dict's are accepted.
        spec = case.operation.label in ("POST /v1/jobs", "POST /v1/weights")
        opaque = case.operation.label == "GET /v1/jobs" and "cursor" in (case.query or {})
        skip = [positive_data_acceptance] if spec or opaque else []
        response = case.call_and_validate(base_url=service, headers=AUTH, excluded_checks=skip)
        errors_name_the_problem(response)

    fuzzed = {op.label for op in operations(service) if fuzz(op, mode, check)}
    assert {"POST /v1/jobs", "GET /v1/jobs", "POST /v1/weights"} <= fuzzed, fuzzed


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_fuzzed_requests_without_a_token(service: str, mode: Any) -> None:
    """Without a token every route but health answers 401, or 400/413/422 for a body
    refused before the token is looked at (its shape is public: /openapi.json);
    never 5xx, always a JSON message."""

    def check(case: Any) -> None:
        response = case.call(base_url=service)
        assert response.status_code < 500, response.text
        errors_name_the_problem(response)
        if case.operation.path != "/v1/health":
            assert response.status_code in (400, 401, 413, 422), response.text

    fuzzed = {op.label for op in operations(service) if fuzz(op, mode, check)}
    assert {"POST /v1/jobs", "GET /v1/jobs", "POST /v1/weights"} <= fuzzed, fuzzed
