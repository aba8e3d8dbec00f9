"""MLflow helpers against a real (SQLite) tracking store: the batched run logger and
the trial run lookup."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from workers import tracking

Store = tuple[tracking.MlflowClient, str]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    return c, exp


def test_run_logger_batches_everything_logged_between_sends(store: Store) -> None:
    c, exp = store
    run_id = c.create_run(exp).info.run_id
    logger = tracking.RunLogger(c, run_id, interval_s=60.0)  # no send before close
    logger.params({"a.bits": 4, "b.bits": 8})
    for epoch in range(50):
        logger.metrics({"train_loss": 1.0 / (epoch + 1)}, epoch)
    logger.metrics({"accuracy": 0.9, "size_bytes": 1234})
    logger.dict({"layers": {"a": 4}}, "policy.json")
    logger.close()
    assert logger.requests == 1  # 50 epochs, 2 params and 2 final metrics: one request
    run = c.get_run(run_id)
    assert run.data.params == {"a.bits": "4", "b.bits": "8"}
    assert run.data.metrics["accuracy"] == 0.9
    history = c.get_metric_history(run_id, "train_loss")
    assert [m.step for m in history] == list(range(50))
    assert history[-1].value == pytest.approx(1 / 50)
    assert [a.path for a in c.list_artifacts(run_id)] == ["policy.json"]


def test_run_logger_splits_batches_at_mlflows_limits(store: Store) -> None:
    c, exp = store
    run_id = c.create_run(exp).info.run_id
    logger = tracking.RunLogger(c, run_id, interval_s=60.0)
    logger.params({f"p{i}": i for i in range(250)})  # at most 100 params per request
    logger.metrics({f"m{i}": i for i in range(1500)})  # at most 1000 items per request
    logger.close()
    run = c.get_run(run_id)
    assert len(run.data.params) == 250
    assert len(run.data.metrics) == 1500
    assert logger.requests == 3  # params+metrics: 100+900, 100+600, 50+0


def test_run_logger_sends_in_the_background_and_raises_the_first_error_at_close(
    store: Store,
) -> None:
    c, exp = store
    run_id = c.create_run(exp).info.run_id
    logger = tracking.RunLogger(c, run_id, interval_s=0.05)
    logger.metrics({"train_loss": 1.0}, 0)
    for _ in range(200):  # sent within a few intervals, without close
        if c.get_run(run_id).data.metrics:
            break
        time.sleep(0.05)
    assert c.get_run(run_id).data.metrics == {"train_loss": 1.0}
    logger.close()
    with pytest.raises(RuntimeError, match="after close"):
        logger.metrics({"late": 1.0})

    broken = tracking.RunLogger(c, "0" * 32, interval_s=60.0)  # no such run
    broken.metrics({"x": 1.0})
    with pytest.raises(MlflowException):
        broken.close()


def test_trial_run_is_found_again_only_in_a_resumed_job(store: Store) -> None:
    c, exp = store
    parent = c.create_run(exp).info.run_id
    first = tracking.trial_run(c, exp, parent, "t1", "trial-001", "job")
    assert first.data.tags["sparq.trial_id"] == "t1"
    assert first.data.tags[tracking.PARENT_TAG] == parent
    again = tracking.trial_run(c, exp, parent, "t1", "trial-001", "job", resumed=True)
    assert again.info.run_id == first.info.run_id  # a rerun after the driver died
    other = tracking.trial_run(c, exp, parent, "t2", "trial-002", "job", resumed=True)
    assert other.info.run_id != first.info.run_id
