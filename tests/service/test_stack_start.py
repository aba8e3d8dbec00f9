"""`sparq up` starts MLflow and the Ray head at once: ``start_mlflow(wait=False)``
returns as soon as the server is spawned and ``Mlflow.ready`` waits for it (or says
why it is not coming). The server runs without MLflow's job runner, which sparq never
uses."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from service import stack


def _spawn_instead(monkeypatch: pytest.MonkeyPatch, code: str) -> dict[str, Any]:
    """``Popen`` runs ``python -c code`` instead of the MLflow server; what it was
    asked to run is kept."""
    seen: dict[str, Any] = {}
    real = subprocess.Popen

    def popen(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        seen.update(cmd=cmd, env=kw.get("env"))
        kw.pop("preexec_fn", None)
        return real([sys.executable, "-c", code], **kw)

    monkeypatch.setattr(stack.subprocess, "Popen", popen)
    return seen


def test_wait_false_returns_at_once_and_ready_says_why_the_server_did_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spawn_instead(monkeypatch, "import time, sys; time.sleep(1.0); sys.exit(3)")
    began = time.monotonic()
    server = stack.start_mlflow(tmp_path, port=stack.free_port(), wait=False)
    assert time.monotonic() - began < 0.9  # not waiting for it
    assert server.proc.poll() is None
    with pytest.raises(stack.StackError, match=r"exited with code 3\); see .*server\.log"):
        server.ready(timeout=30)
    assert server.proc.poll() == 3
    assert seen["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert seen["cmd"][1:4] == ["-m", "mlflow", "server"]


def test_ready_gives_up_after_its_timeout_and_stops_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _spawn_instead(monkeypatch, "import time; time.sleep(60)")
    server = stack.start_mlflow(tmp_path, port=stack.free_port(), wait=False)
    with pytest.raises(stack.StackError, match="did not answer within 1 s"):
        server.ready(timeout=1)
    assert server.proc.wait(20) is not None  # stopped, not left behind
