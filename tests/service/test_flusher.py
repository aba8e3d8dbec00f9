"""The service sends what a finished job's driver could not hand to MLflow."""

from __future__ import annotations

from pathlib import Path

from service import store as st
from service.flusher import WARNING_PREFIX, Flusher
from service.settings import Settings
from workers.search import outbox, tracking

SPEC = {"name": "f", "search": {"trials": 1}}


def test_a_finished_jobs_outbox_is_sent_and_its_warning_taken_back(
    settings: Settings, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    c.create_experiment("sparq/f", artifact_location=(tmp_path / "artifacts").as_uri())
    settings.mlflow_tracking_uri = uri
    store = st.JobStore(settings.db_url)
    job = store.create(SPEC)
    rec = tracking.Recorder(settings.job_dir(job.id) / "outbox", outbox.DRIVER_STREAM)
    rec.experiment("sparq/f")
    rec.run(tracking.PARENT, f"job-{job.id}", {})
    rec.metrics(tracking.PARENT, {"best_accuracy": 0.97})
    other = store.create(SPEC)  # finished before the outbox existed: nothing to send
    store.update(
        job.id, status=st.JobStatus.SUCCEEDED, warnings=[f"{WARNING_PREFIX} yet", "keep me"]
    )
    store.update(other.id, status=st.JobStatus.FAILED)
    running = store.create(SPEC)  # its driver sends its own: left alone
    store.update(running.id, status=st.JobStatus.RUNNING)

    assert Flusher(settings, store).flush() == 1
    after = store.get(job.id)
    assert after.mlflow_synced
    assert after.mlflow_pending == 0
    assert after.warnings == ["keep me"]
    assert after.mlflow_run_id is not None
    assert c.get_run(after.mlflow_run_id).data.metrics["best_accuracy"] == 0.97
    assert store.get(other.id).mlflow_synced
    assert not store.get(running.id).mlflow_synced
    assert store.unsynced_finished() == []
