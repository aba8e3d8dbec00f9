"""The README's main command, as a new user runs it: `sparq demo` on a fresh
SPARQ_HOME, with the demo's spec and the default sampler (`auto`: Optuna's GP sampler
at this size, whose thread limiter once failed a finished demo job; see
workers/envguard.py). Fewer trials than `make demo`'s 40 to keep the suite short,
enough for 7 GP suggestions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import store as st
from service.stack import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_sparq_demo_succeeds_on_a_fresh_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SPARQ_", "RAY_"))}
    env.update(SPARQ_HOME=str(home), PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--trials", "12",
         "--port", str(free_port()), "--mlflow-port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reloaded" in out.stdout
    store = st.JobStore(f"sqlite:///{home / 'sparq.db'}")
    try:
        (job,) = store.list_jobs()
        assert job.status == st.JobStatus.SUCCEEDED
        assert job.spec["search"]["sampler"] == "auto"
        assert job.trials_completed + job.trials_failed == 12
        assert job.trials_failed == 0
        assert job.mlflow_synced  # every MLflow write went through before the demo stopped
        assert not job.warnings
    finally:
        store.close()
    log = (home / "jobs" / job.id / "driver.log").read_text()
    assert "sampler gp" in log
    assert "KeyError" not in log
