"""The stack's servers as `sparq up` starts them (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_the_head_and_a_local_ray_preload_the_same_modules() -> None:
    from workers.search import driver

    assert stack.RAY_PRELOAD == driver.RAY_PRELOAD


@pytest.mark.slow
def test_ray_workers_start_with_torch_and_the_engine_imported(tmp_path: Path) -> None:
    """What RAY_preload_python_modules does in Ray 2.60 (the head's and a local Ray's
    setting): a worker has imported the modules before it runs its first task."""
    code = (
        "import os, sys, ray\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "f = ray.remote(lambda: sorted(m for m in ('torch', 'workers.jobs.trial') "
        "if m in sys.modules))\n"
        "print('seen', ray.get(f.remote()))\n"
    )
    env = {**os.environ, "RAY_preload_python_modules": stack.RAY_PRELOAD}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )
    assert "seen ['torch', 'workers.jobs.trial']" in out.stdout, out.stderr[-2000:]
