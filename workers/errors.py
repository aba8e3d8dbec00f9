"""Exceptions raised on workers. Plain ``Exception`` subclasses with one string
argument, so they pickle across Ray process boundaries."""


class SparqError(Exception):
    """Root of sparq's worker-side errors."""


class SpecError(SparqError):
    """The job spec names something the worker cannot use (bad entrypoint, kwargs)."""


class CheckpointError(SparqError):
    """A checkpoint file is malformed, truncated or of an unknown version."""


def last_line(text: str, default: str) -> str:
    """The last non-blank line of an error's text (a traceback ends with the exception
    itself), or ``default`` when there is none."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else default
