"""What a finished job's driver could not hand to MLflow, sent by the service.

A job's driver sends its outbox (``workers/search/outbox.py``) while it runs, and for a
bounded time at the end; if MLflow was down then, the rest waits on disk and the job
carries a warning. This thread, in the service, sends what is left of finished jobs
once MLflow is back (in order, once: the same sender and state as the driver's),
then marks the job synced and takes the warning back.
"""

from __future__ import annotations

import logging
import os
import threading

from service import store as st
from service.settings import Settings

log = logging.getLogger("sparq.flusher")
WARNING_PREFIX = "MLflow has not taken every record"


def record_mlflow_id(store: st.JobStore, job_id: str, key: str, value: str) -> None:
    """The job store learns an MLflow id as the outbox's sender creates it (keys as in
    workers/search/tracking.py: ``experiment``, ``parent``, ``trial:<id>``)."""
    if key == "experiment":
        store.update(job_id, mlflow_experiment_id=value)
    elif key == "parent":
        store.update(job_id, mlflow_run_id=value)
    elif key.startswith("trial:"):
        store.update_trial(job_id, key.split(":", 1)[1], mlflow_run_id=value)


class Flusher:
    def __init__(self, settings: Settings, store: st.JobStore, *, poll_s: float = 2.0) -> None:
        self.settings, self.store, self.poll_s = settings, store, poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # one request fails fast (the pass is retried); MLflow's client would retry
        # for minutes itself. Adding a variable is safe for readers on other threads.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self._thread = threading.Thread(target=self._loop, name="sparq-flusher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.flush()
            except Exception:  # MLflow still down, a DB hiccup: the next pass retries
                log.debug("flush pass failed", exc_info=True)

    def flush(self) -> int:
        """One pass over finished jobs not yet synced; returns the jobs synced."""
        from workers.search import outbox

        synced = 0
        for job_id in self.store.unsynced_finished():
            job = self.store.get(job_id)
            root = self.settings.job_dir(job.id) / "outbox"
            if not root.is_dir():  # nothing was ever written for MLflow (an older job)
                self.store.update(job.id, mlflow_synced=True)
                continue
            with outbox.sender_lock(root) as mine:
                if mine and self._send(job, root):
                    synced += 1
        return synced

    def _send(self, job: st.Job, root: object) -> bool:
        from pathlib import Path

        from workers.search import outbox, tracking

        def on_id(key: str, value: str) -> None:
            record_mlflow_id(self.store, job.id, key, value)

        path = Path(str(root))
        sender = tracking.MlflowSender(path, self.settings.mlflow_tracking_uri, on_id=on_id)
        sender.send_available()  # raises while MLflow is down
        left = outbox.pending(path)
        warnings = [w for w in (job.warnings or []) if not w.startswith(WARNING_PREFIX)]
        if left == 0:
            self.store.update(job.id, mlflow_pending=0, mlflow_synced=True, warnings=warnings)
            log.info("job %s: the records MLflow missed are sent", job.id)
            return True
        self.store.update(job.id, mlflow_pending=left)
        return False
