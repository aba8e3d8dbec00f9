"""A process environment that threads can read while others write it.

``os.environ`` is not safe to iterate while another thread deletes from it: its
``items()`` lists the keys, then looks each one up, and a key removed in between
raises ``KeyError`` in the reader. Every HTTP request through ``requests`` iterates
the environment (``urllib.request.getproxies``), and libraries do write it at run
time: Optuna 5's GP sampler sets, then *pops*, ``OPENBLAS_NUM_THREADS`` around every
suggestion (``optuna/_gp/thread_limiting.py``). In a search driver that is the Tune
loop suggesting on one thread while MLflow requests go out on another: a write of a
plot failed with ``KeyError: 'OPENBLAS_NUM_THREADS'``.

:func:`harden` makes the process immune, whatever variable and whoever writes it:

- readers of the whole mapping (iteration, ``items``, ``keys``, ``values``, ``copy``)
  see one consistent snapshot, taken under a lock that every write holds;
- the thread-count variables that libraries toggle around numeric work are set once,
  up front, so a library that "restores" them restores a value instead of deleting
  the key (Optuna's limiter pops only a variable that was unset).

Call it at the start of a process, before its threads start. What it cannot cover:
``dict(os.environ)`` and ``{**os.environ}`` list the keys and then read each one, so
a key deleted in between still raises; with the thread variables preset, no library
the driver runs deletes a key while it runs (``tests/workers/test_envguard.py``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

# Variables numeric libraries set (and unset) around their work; see the module doc.
# OpenBLAS reads it once, at load: a set value changes nothing for code running now.
THREAD_VARS = ("OPENBLAS_NUM_THREADS",)

_lock = threading.RLock()


class SafeEnviron(os._Environ):  # os._Environ is private, but what os.environ is
    """``os._Environ`` with atomic snapshots for readers and locked writes."""

    def _snapshot(self) -> dict[str, str]:
        with _lock:
            data = self._data.copy()  # type: ignore[attr-defined]
        return {self.decodekey(k): self.decodevalue(v) for k, v in data.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._snapshot()))

    def items(self) -> Any:
        return self._snapshot().items()

    def values(self) -> Any:
        return self._snapshot().values()

    def keys(self) -> Any:
        return self._snapshot().keys()

    def copy(self) -> dict[str, str]:
        return self._snapshot()

    def __setitem__(self, key: str, value: str) -> None:
        with _lock:
            super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        with _lock:
            super().__delitem__(key)


def harden(thread_vars: tuple[str, ...] = THREAD_VARS) -> None:
    """Make ``os.environ`` safe to read while other threads write it (idempotent)."""
    if not isinstance(os.environ, SafeEnviron):
        os.environ.__class__ = SafeEnviron
    for name in thread_vars:
        # set, not left unset: a library's "restore" then writes it back, never pops it
        os.environ.setdefault(name, str(os.cpu_count() or 1))
