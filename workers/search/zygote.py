"""A warm parent for search drivers: ``python -m workers.search.zygote SOCKET``.

A cold ``python -m workers.search.driver JOB`` spends seconds of CPU importing Ray,
Tune, Optuna, torch, MLflow and the engine before it does anything for its job; on a
stack that runs job after job that is paid again by every one. This process pays it
once: it imports what a driver imports, then waits on a Unix socket, and for each
request forks a child that *is* the job's driver (``workers.search.driver.main``, the
same function a cold driver runs) in a session of its own, logging to the job's
``driver.log``. The service's launcher (:mod:`service.warm`) talks to it and falls
back to a cold driver whenever it cannot.

Forking is safe because this process never starts a thread, never joins Ray and never
runs a torch operation: it only imports. Ray is initialised in each child, as a cold
driver does, so every job is still a Ray job of its own; what a driver computes does
not change (the child seeds Python's and NumPy's global generators from the OS, as a
fresh interpreter would; torch's default seed is the one every process starts with).

Protocol: one JSON line per connection, ``{"job_id": ..., "resume": bool, "log": PATH}``,
answered by ``{"pid": ..., "started": ...}`` or ``{"error": ...}``. Each child's exit
status is written to ``EXITS/<pid>-<start time>`` (``EXITS`` is the socket's directory
plus ``exits/``) when this process reaps it, so the launcher can say how a driver
ended, as it can for a child of its own. The module imports nothing heavy at its top:
a driver's spawned helpers (the views' renderer) import ``__main__`` again.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

READY = "ready"  # what it prints on stdout once it listens
EXITS_DIR = "exits"


def _preload() -> Callable[[list[str]], int]:
    """Everything a driver imports on its way (Ray, Tune, Optuna, torch, MLflow, the
    engine, the search's modules); returns the driver's entry point."""
    import mlflow.tracking  # noqa: F401  (the outbox's sender)
    import optuna  # noqa: F401
    import ray
    import ray.tune  # noqa: F401
    import torch  # noqa: F401

    import workers.search.progress
    import workers.search.sampling
    import workers.search.trials  # noqa: F401
    from workers.search import driver

    return driver.main


def _target(spec: str | None) -> Callable[[list[str]], int]:
    if not spec:
        return _preload()
    module, _, name = spec.partition(":")  # tests: a stand-in for the driver
    import importlib

    fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), name)
    return fn


def _child(target: Callable[[list[str]], int], argv: list[str], log: str) -> None:
    """In the forked child: become a driver in a session of its own; never returns."""
    code = 1
    try:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        import random

        random.seed()  # from the OS, as a fresh interpreter is seeded
        if "numpy" in sys.modules:
            import numpy as np

            np.random.seed()
        sys.argv = ["workers.search.driver", *argv]
        _retitle(" ".join([sys.executable, "-m", "workers.search.driver", *argv]))
        code = int(target(argv) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:  # what the interpreter's exit does, in its order: first wait for the
            # threads and shut executors down (threading._shutdown runs concurrent.futures'
            # exit hook: the live views' renderer pool), then the atexit functions (Ray's
            # shutdown, log handlers). atexit alone joined the renderer's worker process,
            # which waits for work forever: the driver hung after its job had succeeded,
            # holding the launcher's slot (tests/service/test_warm.py).
            import atexit
            import threading

            threading._shutdown()  # type: ignore[attr-defined]
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _retitle(title: str) -> None:
    """The command line ``ps`` shows: a cold driver's, job id included, so an operator
    finds a job's driver as before (Ray's own setproctitle, which workers use too)."""
    try:
        from ray._raylet import setproctitle  # type: ignore[attr-defined]

        setproctitle(title)
    except (ImportError, AttributeError, OSError) as e:
        sys.stderr.write(f"could not set the process title: {e}\n")


def _process_start(pid: int) -> str | None:
    from workers.search.jobstore import process_start

    return process_start(pid)


class Zygote:
    def __init__(self, sock_path: Path, target: Callable[[list[str]], int]) -> None:
        self.sock_path, self.target = sock_path, target
        self.exits = sock_path.parent / EXITS_DIR
        self.exits.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.children: dict[int, str | None] = {}
        self.parent = os.getppid()

    def serve(self) -> None:
        if threading.active_count() != 1:  # a thread would not survive a fork
            raise RuntimeError(f"{threading.active_count()} threads: cannot fork drivers safely")
        tmp = self.sock_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(tmp))
        os.chmod(tmp, 0o600)
        srv.listen(16)
        tmp.replace(self.sock_path)  # only a listening socket is ever at the path
        sys.stdout.write(READY + "\n")
        sys.stdout.flush()
        sel = selectors.DefaultSelector()
        sel.register(srv, selectors.EVENT_READ)
        try:
            while os.getppid() == self.parent:  # the service is gone: so are we
                for _ in sel.select(timeout=0.2):
                    conn, _ = srv.accept()
                    with conn:
                        self._handle(srv, conn)
                self._reap()
        finally:
            sel.close()
            srv.close()
            try:
                if os.stat(self.sock_path).st_ino == os.fstat(srv.fileno()).st_ino:
                    self.sock_path.unlink()
            except (OSError, ValueError):
                pass

    def _handle(self, srv: socket.socket, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            req = json.loads(conn.makefile("rb").readline())
            argv = [str(req["job_id"]), *(["--resume"] if req.get("resume") else [])]
            log = str(req["log"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._answer(conn, {"error": f"bad request: {e}"})
            return
        pid = os.fork()
        if pid == 0:  # the driver
            srv.close()
            conn.close()
            _child(self.target, argv, log)
        started = _process_start(pid)
        self.children[pid] = started
        self._answer(conn, {"pid": pid, "started": started})

    @staticmethod
    def _answer(conn: socket.socket, reply: dict[str, object]) -> None:
        try:
            conn.sendall((json.dumps(reply) + "\n").encode())
        except OSError:
            pass  # the launcher gave up waiting: the driver records itself in the store

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            started = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            (self.exits / f"{pid}-{started}").write_text(str(code))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.search.zygote")
    p.add_argument("socket", type=Path)
    p.add_argument("--target", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Zygote(args.socket, _target(args.target)).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
