"""sparq's exceptions: one root, :class:`SparqError`, and a class per meaning.

Standard library only, so the service (without torch) and the workers both import
it; the API maps the classes that mean an HTTP answer to a status in one table
(``service.api.ERROR_STATUS``). Each pickles across Ray process boundaries (a class
whose constructor takes more than the message says how, in ``__reduce__``).
"""

from __future__ import annotations

from typing import Any


class SparqError(Exception):
    """Root of every error sparq raises on purpose. A builtin exception is a bug."""


class NotFound(SparqError):
    """No such job, trial or weights (or another principal's, answered the same)."""


class Conflict(SparqError):
    """Not possible in the current state (a job with no checkpoint yet)."""


class Unauthorized(SparqError):
    """No valid credentials."""


class Invalid(SparqError):
    """One input that breaks a rule: the field (dotted path), the value, the rule."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        super().__init__(f"{field}={value!r}: {rule}")
        self.field, self.value, self.rule = field, value, rule

    def __reduce__(self) -> Any:
        return (type(self), (self.field, self.value, self.rule))


class TooMany(SparqError):
    """Over a limit on how many (queued jobs of a principal); retry later."""


class TooLarge(SparqError):
    """A body over a size limit (``limit_bytes``), and the setting that sets it."""

    def __init__(self, limit: int, setting: str) -> None:
        super().__init__(f"request body is larger than the limit of {limit} bytes ({setting})")
        self.limit_bytes, self.setting = limit, setting

    def __reduce__(self) -> Any:
        return (type(self), (self.limit_bytes, self.setting))


class SpecError(SparqError):
    """The job spec names something the worker cannot use (bad entrypoint, kwargs)."""


class CheckpointError(SparqError):
    """A checkpoint file is malformed, truncated or of an unknown version."""


def last_line(text: str, default: str) -> str:
    """The last non-blank line of an error's text (a traceback ends with the exception
    itself), or ``default`` when there is none."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else default
