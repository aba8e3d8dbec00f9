"""The job store as the search layer uses it: the one module of workers that imports the
service's store and its process helpers. The driver, its Tune callback and the live views
read and write jobs and trials through these names only, so what workers depend on of
the service is this list (and the pure contract modules: spec, settings, secrets,
tasks, weights; tests/test_layers.py checks both)."""

from __future__ import annotations

from service.flusher import WARNING_PREFIX, record_mlflow_id
from service.procs import process_start
from service.store import Job, JobStatus, JobStore, Trial, TrialStatus, utcnow

__all__ = [
    "WARNING_PREFIX",
    "Job",
    "JobStatus",
    "JobStore",
    "Trial",
    "TrialStatus",
    "process_start",
    "record_mlflow_id",
    "utcnow",
]
