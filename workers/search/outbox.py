"""A durable outbox: what a job wants tracking to hold, on disk first.

Every record a job's processes mean for MLflow (a run to create, metrics, params,
tags, artifacts, a status, a model version) is appended to a stream in the job's
directory (``jobs/JOB/outbox/<stream>.jsonl``) and sent later by one sender
(:class:`workers.search.tracking.MlflowSender`). Appending is a local write: a training loop
or the Tune loop never waits on MLflow, an outage only delays the records, and a
process that dies leaves its records on disk for the next sender.

- A stream has one writer at a time: the driver (``driver``) or one trial
  (``trial-<id>``; a trial run again after a failure appends to the same stream).
  Records are numbered in order; a line cut short by a crash is dropped on reopen.
- What was sent is acknowledged in ``state.json`` (per stream: lines and bytes
  sent; per record key: the MLflow id it got), replaced atomically after each send,
  so a new sender resumes where the last stopped, in order, without duplicates. The
  one record that may have been sent just before a crash is sent idempotently (see
  the sender).
- One sender at a time holds ``.lock`` (``flock``): the job's driver while it runs,
  the service afterwards for what is left.

This module knows nothing of MLflow; records are plain JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
SUFFIX = ".jsonl"
DRIVER_STREAM = "driver"


_open: dict[Path, Outbox] = {}
_open_lock = threading.Lock()


class Outbox:
    """The writing end of one stream; thread-safe. :meth:`open` hands every caller in
    a process the same instance for a stream, so its records are numbered once."""

    @classmethod
    def open(cls, root: Path | str, stream: str) -> Outbox:
        path = (Path(root) / f"{stream}{SUFFIX}").absolute()
        with _open_lock:
            if path not in _open:
                _open[path] = cls(root, stream)
            return _open[path]

    def __init__(self, root: Path | str, stream: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stream = stream
        self.path = self.root / f"{stream}{SUFFIX}"
        self._lock = threading.Lock()
        self._seq = _repair(self.path)
        self._wake: list[threading.Event] = []  # senders in this process to nudge

    def put(self, op: str, **fields: Any) -> None:
        """Append one record (``op`` and its fields, JSON-serialisable) and flush it."""
        with self._lock:
            line = json.dumps({"seq": self._seq, "op": op, **fields}, separators=(",", ":"))
            data = (line + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                while data:  # one write() for a whole line, as a rule: never interleaved
                    data = data[os.write(fd, data) :]
            finally:
                os.close(fd)
            self._seq += 1
        for event in self._wake:
            event.set()


def _repair(path: Path) -> int:
    """Records already in ``path``, after cutting a partial last line (a writer killed
    mid-write)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return data.count(b"\n")


@dataclass
class Cursor:
    lines: int = 0
    bytes: int = 0


@dataclass
class State:
    """What the senders have done so far (``state.json``)."""

    sent: dict[str, Cursor] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # record key -> MLflow id
    dead: list[str] = field(default_factory=list)  # keys deleted or refused: skipped
    dropped: list[str] = field(default_factory=list)  # records MLflow refused, why

    @classmethod
    def load(cls, root: Path) -> State:
        path = root / STATE_FILE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls(
            sent={k: Cursor(**v) for k, v in raw.get("sent", {}).items()},
            ids=dict(raw.get("ids", {})),
            dead=list(raw.get("dead", [])),
            dropped=list(raw.get("dropped", [])),
        )

    def save(self, root: Path) -> None:
        raw = {
            "sent": {k: vars(v) for k, v in self.sent.items()},
            "ids": self.ids,
            "dead": self.dead,
            "dropped": self.dropped,
        }
        tmp = root / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(raw, separators=(",", ":")))
        tmp.replace(root / STATE_FILE)


def streams(root: Path) -> list[str]:
    """Stream names, the driver's first (it creates the runs the others refer to)."""
    names = sorted(p.name[: -len(SUFFIX)] for p in root.glob(f"*{SUFFIX}"))
    return sorted(names, key=lambda n: n != DRIVER_STREAM)


def unsent(root: Path, stream: str, cursor: Cursor) -> Iterator[tuple[Cursor, dict[str, Any]]]:
    """The records of ``stream`` after ``cursor``, each with the cursor past it. Stops
    at a line still being written (no newline yet)."""
    path = root / f"{stream}{SUFFIX}"
    with path.open("rb") as f:
        f.seek(cursor.bytes)
        lines, offset = cursor.lines, cursor.bytes
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            lines, offset = lines + 1, offset + len(raw)
            yield Cursor(lines, offset), json.loads(raw)


def pending(root: Path) -> int:
    """Bytes written but not yet sent, over every stream (0: all sent)."""
    if not root.is_dir():
        return 0
    state = State.load(root)
    total = 0
    for name in streams(root):
        size = (root / f"{name}{SUFFIX}").stat().st_size
        total += max(0, size - state.sent.get(name, Cursor()).bytes)
    return total


@contextlib.contextmanager
def sender_lock(root: Path) -> Iterator[bool]:
    """Hold the outbox's sender lock if no other process does; yields whether it got it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock
