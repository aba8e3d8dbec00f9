"""Process identity: a pid plus its start time names one process for good.

A pid alone does not: once a process is gone the kernel hands its pid to the next
one, so a service that restarts and finds a job's recorded ``driver_pid`` alive may
be looking at a stranger. The start time (field 22 of ``/proc/PID/stat``: clock ticks
since boot) differs between the two, so ``(pid, start time)`` is what the job store
keeps and what the launcher checks before it adopts or signals a process it did not
start. Linux only (``/proc``); elsewhere every process reads as gone.

Standard library only: the search driver imports this module too.
"""

from __future__ import annotations

import os
import signal

_STATE, _STARTTIME = 0, 19  # fields 3 and 22 of /proc/PID/stat, counted after "(comm)"


def process_start(pid: int | None) -> str | None:
    """The start time of process ``pid``, or None when there is no such live process
    (never was, gone, or a zombie: exited and only waiting to be reaped)."""
    if not pid or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm (field 2) is in parentheses and may itself hold spaces or parentheses.
    fields = stat[stat.rfind(")") + 1 :].split()
    if len(fields) <= _STARTTIME or fields[_STATE] in ("Z", "X"):
        return None
    return fields[_STARTTIME]


def same_process(pid: int | None, started: str | None) -> bool:
    """Whether ``pid`` is still the live process that started at ``started``."""
    return started is not None and process_start(pid) == started


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid`` (a driver's whole session: the driver
    and a local Ray it started); nothing if the group is gone."""
    if pid <= 0:  # killpg(0) would signal our own group
        return
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
