"""Shared fixtures. Tests that touch global state get a fresh, isolated copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings, get_settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings rooted in a fresh SPARQ_HOME (job store, job dirs)."""
    monkeypatch.setenv("SPARQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPARQ_DATABASE_URL", raising=False)
    monkeypatch.delenv("SPARQ_API_TOKENS", raising=False)
    get_settings.cache_clear()
    yield get_settings().prepare()
    get_settings.cache_clear()
