"""Secrets stay in the service, on a real `sparq up` with API tokens: user code in the
driver and in a Ray worker reads its own environment and fails with it, as the
issue's `numpy:loadtxt` on `/proc/self/environ` did."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT
from tests.e2e.test_stack import sparq_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "alice-e2e-token-0123456789abcdef"


def test_user_code_sees_no_api_token_and_its_error_shows_none(tmp_path: Path) -> None:
    home, dump = tmp_path / "home", tmp_path / "environ.txt"
    home.mkdir(mode=0o755)
    home.chmod(0o755)  # as a default umask leaves it: `sparq up` closes it
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    spec = {
        "model": {"builtin": "digits-mlp"},
        "dataset": {"entrypoint": "tests.nets:environ_digits", "kwargs": {"dump": str(dump)}},
        "search": {"trials": 2, "concurrency": 1},
    }
    with sparq_up(home, PYTHONPATH=pythonpath, SPARQ_API_TOKENS=f"alice:{TOKEN}") as s:
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
        assert TOKEN not in text
        assert "SPARQ_API_TOKENS" not in text
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "sparq.db").stat().st_mode) == 0o600
    assert TOKEN.encode() not in (home / "sparq.db").read_bytes()
