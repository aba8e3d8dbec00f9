"""The durable outbox and its MLflow sender, against a real (SQLite) tracking store:
records are sent in order, once, across a sender that dies and one that takes over,
and while MLflow is unreachable nothing is lost and nothing is acknowledged."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from workers.search import outbox, tracking


@pytest.fixture
def uri(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    c.create_experiment("sparq/t", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri


def _job(root: Path) -> tuple[tracking.Recorder, tracking.Recorder]:
    """A driver stream that creates the parent run and a trial stream under it."""
    driver = tracking.Recorder(root, outbox.DRIVER_STREAM)
    driver.experiment("sparq/t")
    driver.run(tracking.PARENT, "job-1", {"sparq.job_id": "1"})
    trial = tracking.Recorder(root, tracking.trial_stream("a"))
    key = tracking.trial_key("a")
    trial.run(key, "trial-001", {"sparq.trial_id": "a"}, parent=tracking.PARENT)
    trial.params(key, {"fc.bits": 4})
    for epoch in range(5):
        trial.metrics(key, {"train_loss": 1.0 / (epoch + 1)}, epoch)
    trial.metrics(key, {"accuracy": 0.9, "size_bytes": 1234})
    trial.status(key, "FINISHED")
    return driver, trial


def _runs(uri: str) -> list[object]:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("sparq/t")
    assert exp is not None
    return list(c.search_runs([exp.experiment_id]))


def test_records_reach_mlflow_in_order_with_ids_told(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "outbox"
    _job(root)
    told: dict[str, str] = {}
    sender = tracking.MlflowSender(root, uri, on_id=told.__setitem__)
    assert sender.send_available() == 11
    assert outbox.pending(root) == 0
    c = tracking.client(uri)
    trial = c.get_run(told[tracking.trial_key("a")])
    assert trial.data.tags[tracking.PARENT_TAG] == told[tracking.PARENT]
    assert trial.data.params == {"fc.bits": "4"}
    assert trial.data.metrics["accuracy"] == 0.9
    assert trial.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(trial.info.run_id, "train_loss")] == list(range(5))
    assert sender.send_available() == 0  # nothing twice


def test_a_trial_stream_ahead_of_its_parent_waits_for_it(tmp_path: Path, uri: str) -> None:
    """A trial's records may be on disk before the driver's run record is sent."""
    root = tmp_path / "outbox"
    trial = tracking.Recorder(root, tracking.trial_stream("b"))
    trial.run(tracking.trial_key("b"), "trial-002", {}, parent=tracking.PARENT)
    sender = tracking.MlflowSender(root, uri)
    assert sender.send_available() == 0  # blocked: no parent yet
    driver = tracking.Recorder(root, outbox.DRIVER_STREAM)
    driver.experiment("sparq/t")
    driver.run(tracking.PARENT, "job-2", {})
    assert sender.send_available() == 3
    assert len(_runs(uri)) == 2


def test_mlflow_down_keeps_everything_and_a_new_sender_sends_it_once(
    tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outage, then a restart: the records sent before are not sent again, the
    rest is, in order."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    root = tmp_path / "outbox"
    driver, _ = _job(root)
    tracking.MlflowSender(root, uri).send_available()  # everything so far reached MLflow
    key = tracking.trial_key("a")
    driver.tags(key, {"pareto": "true"})
    driver.metrics(tracking.PARENT, {"hypervolume": 0.5}, step=1)
    with socket.socket() as s:  # a port nobody listens on: MLflow is down
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    before = outbox.pending(root)
    with pytest.raises(Exception, match=r"(?i)connect|refused|failed"):
        tracking.MlflowSender(root, down).send_available()
    assert outbox.pending(root) == before > 0  # nothing acknowledged
    again = tracking.MlflowSender(root, uri)  # back, in a new process (state on disk)
    assert again.send_available() == 2
    runs = _runs(uri)
    assert len(runs) == 2  # no run created twice
    ids = outbox.State.load(root).ids
    c = tracking.client(uri)
    assert c.get_run(ids[key]).data.tags["pareto"] == "true"
    assert [m.value for m in c.get_metric_history(ids[tracking.PARENT], "hypervolume")] == [0.5]


def test_a_record_sent_just_before_a_crash_is_not_doubled(tmp_path: Path, uri: str) -> None:
    """The sender died after MLflow created the run but before it saved its state:
    the next one finds the run by its key tag instead of creating another."""
    root = tmp_path / "outbox"
    _job(root)
    first = tracking.MlflowSender(root, uri)
    first.send_available()
    (root / outbox.STATE_FILE).unlink()  # as if no state had ever been saved
    tracking.MlflowSender(root, uri).send_available()
    assert len(_runs(uri)) == 2
    c = tracking.client(uri)
    trial_id = outbox.State.load(root).ids[tracking.trial_key("a")]
    assert len(c.get_metric_history(trial_id, "train_loss")) == 5  # same timestamps: once


def test_a_refused_record_is_dropped_after_retries_and_said(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "outbox"
    driver, _ = _job(root)
    driver.artifact(tracking.PARENT, tmp_path / "no-such-file.sparq")
    driver.tags(tracking.PARENT, {"after": "yes"})
    sender = tracking.MlflowSender(root, uri)
    for _ in range(tracking.REFUSED_ATTEMPTS):
        sender.send_available()
    state = outbox.State.load(root)
    assert len(state.dropped) == 1
    assert "artifact" in state.dropped[0]
    assert outbox.pending(root) == 0  # the record after it went through
    c = tracking.client(uri)
    assert c.get_run(state.ids[tracking.PARENT]).data.tags["after"] == "yes"


def test_deleted_run_is_never_created_and_its_records_are_skipped(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "outbox"
    driver, _ = _job(root)
    driver.delete(tracking.trial_key("a"))  # a trial the resumed search never knew
    tracking.MlflowSender(root, uri).send_available()
    # the trial stream came after the delete in this pass? it was sent first: deleted
    runs = [r for r in _runs(uri) if r.info.lifecycle_stage == "active"]  # type: ignore[attr-defined]
    assert len(runs) == 1


def test_register_is_idempotent_and_sets_the_alias(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "outbox"
    driver, _ = _job(root)
    ck = tmp_path / "best.sparq"
    ck.write_bytes(b"SPARQ")
    driver.artifact(tracking.PARENT, ck, "model")
    for _ in range(2):  # said twice (a resumed driver): one version
        driver.register(tracking.PARENT, "model", name="sparq-t", tags={"a": 1}, description="d")
    tracking.MlflowSender(root, uri).send_available()
    c = tracking.client(uri)
    versions = c.search_model_versions("name = 'sparq-t'")
    assert len(versions) == 1
    assert c.get_model_version_by_alias("sparq-t", "best").version == versions[0].version


def test_consecutive_batches_of_a_run_go_in_one_request(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "outbox"
    _job(root)
    sender = tracking.MlflowSender(root, uri)
    calls: list[int] = []
    real = sender.c.log_batch

    def counting(*a: object, **k: object) -> None:
        calls.append(1)
        real(*a, **k)  # type: ignore[arg-type]

    sender.c.log_batch = counting  # type: ignore[method-assign]
    sender.send_available()
    assert len(calls) == 1  # params + 6 metric records of the trial


def test_outbox_cuts_a_line_a_killed_writer_left_half_written(tmp_path: Path) -> None:
    root = tmp_path / "outbox"
    box = outbox.Outbox(root, "trial-x")
    box.put("status", run="k", status="RUNNING")
    with box.path.open("a") as f:
        f.write('{"seq":1,"op":"sta')  # killed mid-write
    again = outbox.Outbox(root, "trial-x")  # the trial run again
    again.put("status", run="k", status="FINISHED")
    lines = [json.loads(x) for x in box.path.read_text().splitlines()]
    assert [r["seq"] for r in lines] == [0, 1]
    assert lines[1]["status"] == "FINISHED"


def test_one_sender_at_a_time(tmp_path: Path) -> None:
    root = tmp_path / "outbox"
    got: list[bool] = []
    with outbox.sender_lock(root) as mine:
        assert mine
        t = threading.Thread(target=lambda: _try_lock(root, got))
        t.start()
        t.join()
    assert got == [False]
    with outbox.sender_lock(root) as mine:
        assert mine


def _try_lock(root: Path, got: list[bool]) -> None:
    with outbox.sender_lock(root) as mine:
        got.append(mine)


def test_a_sender_thread_sends_what_its_recorder_writes(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "outbox"
    driver, _ = _job(root)
    sender = tracking.MlflowSender(root, uri, poll_s=30)
    sender.watch(driver)
    sender.start()
    try:
        assert sender.drain(30) == 0
        driver.tags(tracking.PARENT, {"late": "1"})  # wakes the sender, not its poll
        assert sender.drain(10) == 0
    finally:
        sender.close()
    c = tracking.client(uri)
    assert c.get_run(outbox.State.load(root).ids[tracking.PARENT]).data.tags["late"] == "1"


def test_two_jobs_in_one_experiment_get_their_own_runs(tmp_path: Path, uri: str) -> None:
    """Every job's parent is keyed ``parent``: finding a run again must not find
    another job's (jobs of one name share an experiment)."""
    for job in ("1", "2"):
        root = tmp_path / f"job{job}" / "outbox"
        rec = tracking.Recorder(root, outbox.DRIVER_STREAM)
        rec.experiment("sparq/t")
        rec.run(tracking.PARENT, f"job-{job}", {"sparq.job_id": job})
        tracking.MlflowSender(root, uri).send_available()
    ids = {outbox.State.load(tmp_path / f"job{j}" / "outbox").ids[tracking.PARENT] for j in "12"}
    assert len(ids) == 2
    assert len(_runs(uri)) == 2


def test_of_one_file_rewritten_in_a_pass_only_the_last_version_is_sent(
    tmp_path: Path, uri: str
) -> None:
    """The front's files are rewritten after every trial: a pass sends the last
    version of each (run, file) and counts the others as sent; other files and
    other runs' files are all sent."""
    root = tmp_path / "outbox"
    driver, _ = _job(root)
    for n in range(4):
        driver.log_dict(tracking.PARENT, {"front": n}, "pareto/front.json")
        driver.table(tracking.PARENT, [{"trial": n}], "pareto/front_table.json")
    driver.log_dict(tracking.PARENT, {"space": 1}, "search_space.json")
    sender = tracking.MlflowSender(root, uri)
    uploads: list[str] = []
    real = sender.c.log_dict

    def counting(run_id: str, obj: object, file: str) -> None:
        uploads.append(file)
        real(run_id, obj, file)

    sender.c.log_dict = counting  # type: ignore[method-assign]
    assert sender.send_available() == 11 + 9  # every record counted as sent
    assert sorted(uploads) == ["pareto/front.json", "search_space.json"]
    c = tracking.client(uri)
    parent = outbox.State.load(root).ids[tracking.PARENT]
    front = c.download_artifacts(parent, "pareto/front.json", str(tmp_path / "dl"))
    assert json.loads(Path(front).read_text()) == {"front": 3}
    table = c.download_artifacts(parent, "pareto/front_table.json", str(tmp_path / "dl"))
    assert json.loads(Path(table).read_text())["data"] == [[3]]
    assert sender.send_available() == 0


def test_passes_are_min_gap_apart_until_drained(tmp_path: Path, uri: str) -> None:
    """While the job runs, records written between two passes go in the next one;
    drain() sends at once."""
    import time

    root = tmp_path / "outbox"
    driver, _ = _job(root)
    sender = tracking.MlflowSender(root, uri, poll_s=0.05, min_gap_s=30)
    sender.watch(driver)
    passes: list[float] = []
    real = sender.send_available

    def counting() -> int:
        passes.append(time.monotonic())
        return real()

    sender.send_available = counting  # type: ignore[method-assign]
    sender.start()
    try:
        time.sleep(1.0)
        driver.tags(tracking.PARENT, {"late": "1"})  # wakes it, but within the gap
        time.sleep(0.5)
        assert len(passes) == 1
        started = time.monotonic()
        assert sender.drain(10) == 0  # no gap once draining
        assert time.monotonic() - started < 5
    finally:
        sender.close()
    c = tracking.client(uri)
    assert c.get_run(outbox.State.load(root).ids[tracking.PARENT]).data.tags["late"] == "1"
