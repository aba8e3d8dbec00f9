"""The reproductions of "Safe to share", against a real `sparq up` with two principals
over loopback HTTP: each fails safely (a 4xx naming the field, no command run, no
secret shown, no other owner's data)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_stack import sparq_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ALICE, BOB = "a" * 24, "b" * 24
BUILTIN = {
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 16}},
    "dataset": {"builtin": "digits"},
    "baseline": {"epochs": 1},
    "search": {"trials": 1},
}


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_shared_stack_fails_every_reproduction_safely(tmp_path: Path) -> None:
    home, marker = tmp_path / "home", tmp_path / "pwned"
    home.mkdir()
    tokens = f"alice:{ALICE},bob:{BOB}"
    # the operator allows no entrypoints: the default
    with sparq_up(home, SPARQ_API_TOKENS=tokens, SPARQ_ENTRYPOINT_MODULES="") as stack:
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
            ("model", {"entrypoint": "tests.nets:residual_cnn"}),  # not allowed here
        ]:
            r = post({**BUILTIN, field: source})
            assert r.status_code == 422, r.text
            [detail] = r.json()["detail"]
            assert detail["field"] == f"{field}.entrypoint"
            module = source["entrypoint"].partition(":")[0]
            assert f"module {module!r}" in detail["rule"]
        assert not marker.exists()
        r = post({**BUILTIN, "model": {"entrypoint": "tests.nets:residual_cnn"}})
        assert "SPARQ_ENTRYPOINT_MODULES" in r.json()["message"]

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
