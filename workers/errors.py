"""Exceptions raised on workers. Plain ``Exception`` subclasses with one string
argument, so they pickle across Ray process boundaries."""


class SparqError(Exception):
    """Root of sparq's worker-side errors."""


class SpecError(SparqError):
    """The job spec names something the worker cannot use (bad entrypoint, kwargs)."""


class CheckpointError(SparqError):
    """A checkpoint file is malformed, truncated or of an unknown version."""
