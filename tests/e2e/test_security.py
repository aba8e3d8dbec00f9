"""The reproductions of "Safe to share", against one real `sparq up` with two
principals over loopback HTTP: each fails safely (a 4xx naming the field, no command
run, no secret shown, no other owner's data), and user code the operator allowed
sees no API token in its environment, nor does its error."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT
from tests.e2e.test_stack import Stack, sparq_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALICE, BOB = "alice-e2e-token-0123456789abcdef", "b" * 24
BUILTIN = {
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 16}},
    "dataset": {"builtin": "digits"},
    "baseline": {"epochs": 1},
    "search": {"trials": 1},
}


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Tokens for alice and bob; the operator allows only `tests.nets` (the hostile
    dataset below); SPARQ_HOME left 0755, as a default umask makes it."""
    home = tmp_path_factory.mktemp("secure") / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {"SPARQ_API_TOKENS": f"alice:{ALICE},bob:{BOB}", "PYTHONPATH": pythonpath}
    with sparq_up(home, SPARQ_ENTRYPOINT_MODULES="tests.nets", **env) as stack:
        yield stack


def test_a_shared_stack_fails_every_reproduction_safely(shared: Stack, tmp_path: Path) -> None:
    stack, home, marker = shared, shared.home, tmp_path / "pwned"
    api = stack.api

    def post(body: object, token: str = ALICE, raw: bytes | None = None) -> httpx.Response:
        content = raw if raw is not None else json.dumps(body).encode()
        headers = {**_as(token), "Content-Type": "application/json"}
        return httpx.post(f"{api}/v1/jobs", content=content, headers=headers, timeout=30)

    # code the operator did not allow: 422 naming the field, the module, the setting
    for field, source in [
        ("model", {"entrypoint": "os:system", "kwargs": {"command": f"touch {marker}"}}),
        ("model", {"entrypoint": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}}),
        ("model", {"entrypoint": "builtins:exec", "kwargs": {"source": "1"}}),
        ("model", {"entrypoint": "shutil:rmtree", "kwargs": {"path": str(tmp_path)}}),
        ("dataset", {"entrypoint": "numpy:loadtxt", "kwargs": {"fname": "/proc/self/environ"}}),
        ("model", {"entrypoint": "acme.vision:net"}),  # not allowed here
    ]:
        r = post({**BUILTIN, field: source})
        assert r.status_code == 422, r.text
        [detail] = r.json()["detail"]
        assert detail["field"] == f"{field}.entrypoint"
        module = source["entrypoint"].partition(":")[0]
        assert f"module {module!r}" in detail["rule"]
    assert not marker.exists()
    r = post({**BUILTIN, "model": {"entrypoint": "acme.vision:net"}})
    assert "SPARQ_ENTRYPOINT_MODULES is tests.nets" in r.json()["message"]

    # bounded input: NaN, Infinity, a body over the limit, no token
    nan = json.dumps(BUILTIN)[:-1] + ', "baseline": {"lr": NaN}}'
    assert post(None, raw=nan.encode()).status_code == 422
    inf = json.dumps(BUILTIN)[:-1] + ', "search": {"time_budget_s": Infinity}}'
    assert post(None, raw=inf.encode()).status_code == 422
    assert post(None, raw=b"[" + b"1," * (3 << 20) + b"1]").status_code == 413
    assert httpx.get(f"{api}/v1/jobs", timeout=30).status_code == 401

    # jobs belong to their owner
    job = post(BUILTIN).json()
    assert job["owner"] == "alice"
    unknown = httpx.get(f"{api}/v1/jobs/000000000000", headers=_as(BOB), timeout=30)
    for path in ("", "/trials", "/pareto", "/checkpoint"):
        r = httpx.get(f"{api}/v1/jobs/{job['id']}{path}", headers=_as(BOB), timeout=30)
        assert r.status_code == 404, (path, r.text)
    r = httpx.get(f"{api}/v1/jobs/{job['id']}", headers=_as(BOB), timeout=30)
    assert r.json() == {
        **unknown.json(),
        "message": unknown.json()["message"].replace("000000000000", job["id"]),
    }
    mine = httpx.get(f"{api}/v1/jobs", headers=_as(BOB), timeout=30).json()["jobs"]
    assert mine == []
    r = httpx.post(f"{api}/v1/jobs/{job['id']}/cancel", headers=_as(BOB), timeout=30)
    assert r.status_code == 404
    assert httpx.get(f"{api}/v1/jobs/{job['id']}", headers=_as(ALICE), timeout=30).json()[
        "cancel_requested"
    ] is False  # fmt: skip
    r = httpx.post(f"{api}/v1/jobs/{job['id']}/cancel", headers=_as(ALICE), timeout=30)
    assert r.status_code == 200

    # a server path outside SPARQ_WEIGHTS_DIRS (here: none) is refused
    other = home / "jobs" / job["id"] / "baseline.npz"
    r = post({**BUILTIN, "baseline": {"weights": str(other)}})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "baseline.weights"

    # secrets stay in the service: no internal address, no token, private files
    health = httpx.get(f"{api}/v1/health", timeout=30).text
    assert "127.0.0.1" not in health
    assert "tracking_uri" not in health
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "sparq.db").stat().st_mode) == 0o600
    for path in (home / "jobs").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_user_code_sees_no_api_token_and_its_error_shows_none(
    shared: Stack, tmp_path: Path
) -> None:
    """As the issue's `numpy:loadtxt` on `/proc/self/environ` did: user code in the
    driver and in a Ray worker reads its own environment and fails with it."""
    home, dump = shared.home, tmp_path / "environ.txt"
    auth = _as(ALICE)
    spec = {
        "model": {"builtin": "digits-mlp"},
        "dataset": {"entrypoint": "tests.nets:environ_digits", "kwargs": {"dump": str(dump)}},
        "search": {"trials": 2, "concurrency": 1},
    }
    s = shared
    assert httpx.get(f"{s.api}/v1/health").json() == {"status": "ok", "version": "0.1.0"}
    r = httpx.post(f"{s.api}/v1/jobs", json=spec, headers=auth, timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        job = httpx.get(f"{s.api}/v1/jobs/{job_id}", headers=auth).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    trials = httpx.get(f"{s.api}/v1/jobs/{job_id}/trials", headers=auth).text
    assert job["status"] == "failed"
    assert "could not parse" in job["error"]  # the worker's environment, as user code saw it
    seen = dump.read_text()
    assert "SPARQ_DATABASE_URL=" in seen  # the driver's environment
    for text in (seen, job["error"], trials, str(job)):
        assert ALICE not in text
        assert "SPARQ_API_TOKENS" not in text
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "sparq.db").stat().st_mode) == 0o600
    assert ALICE.encode() not in (home / "sparq.db").read_bytes()
