"""A driver forked by the warm process exits like a cold one when its work is done.

It once hung after its job succeeded: the zygote's child ran the atexit functions
without first shutting down the threads' executors, so multiprocessing joined the
live views' renderer process (a spawn ProcessPoolExecutor), which waits for work
forever; the hung driver kept the launcher's only slot and every later job stayed
queued."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from workers.search import zygote

_KEPT: list[ProcessPoolExecutor] = []


def _renders_once(argv: list[str]) -> int:
    """A driver that leaves a renderer pool open and referenced (as the driver's live
    views hold theirs) when its main returns."""
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    _KEPT.append(pool)
    assert pool.submit(abs, -7).result() == 7
    return 3


def test_a_forked_driver_with_a_renderer_pool_exits_with_its_code(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # the warm process's child: never returns
        zygote._child(_renders_once, ["job"], str(tmp_path / "driver.log"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 3, (tmp_path / "driver.log").read_text()
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked driver did not exit within 60 s of its work ending")
