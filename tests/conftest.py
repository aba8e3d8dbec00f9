"""Shared fixtures. Tests that touch global state get a fresh, isolated copy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings, get_settings


@pytest.fixture(autouse=True)
def _allow_test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite allows its own test models (``tests.nets``, ...) as an operator allows
    theirs: SPARQ_ENTRYPOINT_MODULES. Tests of the rule set it themselves."""
    monkeypatch.setenv("SPARQ_ENTRYPOINT_MODULES", "tests")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings rooted in a fresh SPARQ_HOME (job store, job dirs)."""
    monkeypatch.setenv("SPARQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPARQ_DATABASE_URL", raising=False)
    monkeypatch.delenv("SPARQ_API_TOKENS", raising=False)
    get_settings.cache_clear()
    yield get_settings().prepare()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL server for the session (tests/postgres.py). Skipped where
    there are no PostgreSQL binaries, unless SPARQ_REQUIRE_POSTGRES=1 (CI sets it)."""
    from tests.postgres import pg_bin, postgres_server

    if pg_bin() is None:
        if os.environ.get("SPARQ_REQUIRE_POSTGRES") == "1":
            pytest.fail("SPARQ_REQUIRE_POSTGRES=1 but no PostgreSQL binaries are installed")
        pytest.skip("no PostgreSQL binaries (apt-get install postgresql); .ci/run installs them")
    with postgres_server() as pg:
        yield pg
