"""One `sparq up` for the e2e modules that need a plain stack (test_stack, test_live,
test_generality): jobs are isolated by job id and run one at a time, and starting a
stack (MLflow server, Ray head, API) costs about 25 s. Modules that need a stack of
their own (a cluster, PostgreSQL, an object store, a stack they kill) start one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_stack import Stack, sparq_up

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PYTHONPATH names the repository so `tests.nets` is importable on the workers, as
    a user's package would be (test_generality submits models by entrypoint)."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    with sparq_up(tmp_path_factory.mktemp("sparq-shared"), PYTHONPATH=pythonpath) as s:
        yield s
