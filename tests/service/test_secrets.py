"""Secrets stay in the service: the environments of what it starts, the texts it
stores and shows, the modes of SPARQ_HOME, the health route."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import stack
from service import store as st
from service.api import create_app
from service.launcher import driver_env
from service.secrets import known_secrets, scrub, scrub_env, url_password
from service.settings import Settings

TOKEN = "alice-token-0123456789abcdef"
BARE = "bare-token-fedcba9876543210"
PG = "postgresql+psycopg://sparq:pg%2Fpass-0123@db:5432/sparq"
SPEC = {"name": "t", "search": {"trials": 2}}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- environments ------------------------------------------------------------------


def test_scrub_env_removes_every_secret_but_those_kept() -> None:
    env = {
        "PATH": "/usr/bin",
        "SPARQ_HOME": "/data",
        "SPARQ_MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "SPARQ_RAY_ADDRESS": "ray-head:6379",
        "RAY_AUTH_TOKEN_PATH": "/data/ray_auth_token",
        "SPARQ_API_TOKENS": f"alice:{TOKEN}",
        "SPARQ_TOKEN": TOKEN,
        "SPARQ_DATABASE_URL": PG,
        "SPARQ_MLFLOW_BACKEND_URI": PG,
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "RAY_AUTH_TOKEN": "ray-secret",
    }
    assert scrub_env(env) == {
        k: env[k]
        for k in (
            "PATH",
            "SPARQ_HOME",
            "SPARQ_MLFLOW_TRACKING_URI",
            "SPARQ_RAY_ADDRESS",
            "RAY_AUTH_TOKEN_PATH",
        )
    }
    kept = scrub_env(env, keep=("RAY_AUTH_TOKEN",))
    assert kept["RAY_AUTH_TOKEN"] == "ray-secret"
    assert "SPARQ_API_TOKENS" not in kept
    assert "AWS_SECRET_ACCESS_KEY" not in kept


def test_a_driver_gets_no_api_token_and_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARQ_API_TOKENS", f"alice:{TOKEN},{BARE}")
    monkeypatch.setenv("SPARQ_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-secret")
    settings = Settings(home=tmp_path, database_url=PG, ray_address="127.0.0.1:6379")
    env = driver_env(settings)
    assert "SPARQ_API_TOKENS" not in env
    assert "SPARQ_TOKEN" not in env
    assert not any(TOKEN in v or BARE in v for v in env.values())
    assert "AWS_SECRET_ACCESS_KEY" not in env  # artifacts go through the MLflow server
    assert env["SPARQ_DATABASE_URL"] == PG
    assert env["SPARQ_RAY_ADDRESS"] == "127.0.0.1:6379"
    assert env["RAY_AUTH_TOKEN"] == "ray-secret"  # it joins the cluster


class _Captured(Exception):
    pass


def _capture_popen(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Popen in service.stack records its arguments and starts nothing."""
    seen: dict[str, Any] = {}

    def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.update(kwargs, cmd=cmd)
        raise _Captured

    monkeypatch.setattr(stack.subprocess, "Popen", popen)
    return seen


def test_the_mlflow_server_gets_the_object_store_credentials_and_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPARQ_API_TOKENS", TOKEN)
    monkeypatch.setenv("SPARQ_DATABASE_URL", PG)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    seen = _capture_popen(monkeypatch)
    with pytest.raises(_Captured):
        stack.start_mlflow(tmp_path, port=stack.free_port(), backend_uri=PG)
    env = seen["env"]
    assert "SPARQ_API_TOKENS" not in env
    assert "SPARQ_DATABASE_URL" not in env
    assert "RAY_AUTH_TOKEN" not in env
    assert env["AWS_SECRET_ACCESS_KEY"] == "aws-secret"
    assert env["MLFLOW_BACKEND_STORE_URI"] == PG
    assert not any("pass-0123" in arg for arg in seen["cmd"])  # not on the command line


def test_the_ray_head_and_its_workers_get_no_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(name, "")  # ray_auth_env sets them: restored after
    monkeypatch.setenv("SPARQ_API_TOKENS", TOKEN)
    monkeypatch.setenv("SPARQ_DATABASE_URL", PG)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    seen = _capture_popen(monkeypatch)
    with pytest.raises(_Captured):
        stack.start_ray(tmp_path, 1)
    env = seen["env"]
    assert not {"SPARQ_API_TOKENS", "SPARQ_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "ray_auth_token")


# -- texts -------------------------------------------------------------------------


def test_scrub_hides_every_secret_whole() -> None:
    assert scrub("a abc b ab", ["ab", "abc", ""]) == "a *** b ***"
    assert url_password(PG) == {"pg%2Fpass-0123", "pg/pass-0123"}
    assert url_password("sqlite:////data/sparq.db") == set()
    assert url_password(None) == set()


def test_known_secrets_are_the_tokens_passwords_and_ray_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text("ray-file-secret\n")
    env = {"RAY_AUTH_TOKEN_PATH": str(token_file), "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    settings = Settings(
        home=tmp_path,
        api_tokens=[f"alice:{TOKEN}", BARE],
        database_url=PG,
        mlflow_backend_uri="postgresql://mlflow:mlflow-pass@db/mlflow",
    )
    assert known_secrets(settings, env) == {
        TOKEN,
        BARE,
        "pg%2Fpass-0123",
        "pg/pass-0123",
        "mlflow-pass",
        "ray-file-secret",
        "aws-secret",
    }


@pytest.fixture
def store(settings: Settings) -> Iterator[st.JobStore]:
    s = st.JobStore(settings.db_url, {TOKEN})
    yield s
    s.close()


def test_the_store_hides_secrets_from_every_text_it_writes(store: st.JobStore) -> None:
    job = store.create(SPEC)
    environ = f"PATH=/bin\x00SPARQ_API_TOKENS=alice:{TOKEN}\x00"
    store.update(job.id, error=f"ValueError: could not convert {environ!r}", warnings=[TOKEN])
    store.transition(job.id, {st.JobStatus.QUEUED}, message=f"said {TOKEN}")
    store.upsert_trial(job.id, "t1", number=1, status=st.TrialStatus.FAILED, error=f"x {TOKEN}")
    store.upsert_trial(job.id, "t2", number=2, status=st.TrialStatus.COMPLETED)
    store.update_trial(job.id, "t2", error=f"y {TOKEN}")
    got = store.get(job.id)
    assert "alice:***" in (got.error or "")
    assert (got.message, got.warnings) == ("said ***", ["***"])
    assert [t.error for t in store.trials(job.id)] == ["x ***", "y ***"]


def test_the_api_shows_no_secret_a_row_holds(settings: Settings) -> None:
    """Defence in depth: a row written by a process that did not know the token (a
    driver has none) is shown with the token hidden."""
    secured = settings.model_copy(update={"api_tokens": [f"alice:{TOKEN}"]})
    blind = st.JobStore(settings.db_url)  # knows no token
    job = blind.create(SPEC, owner="alice")
    blind.update(job.id, error=f"leak {TOKEN}", message=TOKEN, warnings=[f"w {TOKEN}"])
    blind.upsert_trial(job.id, "t1", number=1, status=st.TrialStatus.FAILED, error=TOKEN)
    blind.close()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(secured, launch=False)) as c:
        shown = [
            c.get(f"/v1/jobs/{job.id}", headers=auth).text,
            c.get("/v1/jobs", headers=auth).text,
            c.get(f"/v1/jobs/{job.id}/trials", headers=auth).text,
            c.get(f"/v1/jobs/{job.id}/checkpoint", headers=auth).text,
        ]
        view = c.get(f"/v1/jobs/{job.id}", headers=auth).json()
    assert not any(TOKEN in text for text in shown)
    assert (view["error"], view["message"], view["warnings"]) == ("leak ***", "***", ["w ***"])


# -- SPARQ_HOME ----------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)  # the most permissive: prepare() must close it
    yield
    os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_sparq_home_is_private(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home").prepare()
    store = st.JobStore(settings.db_url)
    store.create(SPEC)
    store.close()
    assert _mode(settings.home) == 0o700
    assert _mode(settings.jobs_dir) == 0o700
    assert _mode(settings.home / "sparq.db") == 0o600


@pytest.mark.usefixtures("open_umask")
def test_an_open_sparq_home_is_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="sparq.settings"):
        Settings(home=home).prepare()
    assert _mode(home) == 0o700
    assert "0755" in caplog.text


# -- health --------------------------------------------------------------------------


def test_health_reveals_no_address(settings: Settings) -> None:
    with TestClient(create_app(settings, launch=False)) as c:
        body = c.get("/v1/health").json()
    assert set(body) == {"status", "version"}
    assert settings.mlflow_tracking_uri not in str(body)
