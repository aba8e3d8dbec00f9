"""The stack's servers as `sparq up` starts them (real processes)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service import stack


def _children(pid: int) -> list[str]:
    """Command lines of every process below ``pid``."""
    out: list[str] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            try:
                out.append(Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
            todo.append(kid)
    return out


@pytest.mark.slow
def test_the_mlflow_server_starts_no_job_runner(tmp_path: Path) -> None:
    """MLflow's job runner (a runner and eight huey consumers, each importing MLflow)
    serves GenAI scorer jobs sparq never submits: the stack's server goes without."""
    server = stack.start_mlflow(tmp_path, port=stack.free_port())
    try:
        time.sleep(3)  # the runner, when enabled, starts right after the server answers
        kids = _children(server.proc.pid)
        assert any("uvicorn" in k for k in kids)  # the server itself is there
        assert not [k for k in kids if "huey" in k or "_job_runner" in k]
    finally:
        server.stop()
