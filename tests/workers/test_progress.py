"""The search's progress callback and stopper against fakes: a fake Tune trial, a real
job store on a temporary SQLite file, the job's outbox on disk and no renderer. What
each finished trial leaves in the job store and the outbox, the front it counts, and
when the stopper ends the search."""

from __future__ import annotations

import math
import pickle
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest

from search_spaces import KnobSpace, policy_from_params, to_optuna
from service import store as st
from service.settings import Settings
from service.spec import JobSpec
from workers.jobs.baseline import describe_model, knob_space
from workers.search import live, outbox, progress, tracking
from workers.search.progress import JobProgress, JobStopper

MINIMAL_SPEC = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}
BASELINE_SIZE = 10_000
BASELINE_ACCURACY = 0.95


@dataclass
class FakeTrial:
    """What the callback reads of a Tune trial; ``str()`` is its name."""

    trial_id: str
    name: str
    config: dict[str, Any]
    last_result: dict[str, Any] | None = None
    error_file: str | None = None

    def __str__(self) -> str:
        return self.name


@dataclass
class FakeViews:
    """Stands in for the live views: records what was submitted, starts no renderer."""

    rec: Any
    views_dir: Path
    submitted: list[live.Snapshot] = field(default_factory=list)
    closed: bool = False

    def submit(self, snap: live.Snapshot) -> None:
        self.submitted.append(snap)

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def space() -> KnobSpace:
    """The digits MLP's search space, built as the driver builds it."""
    spec = JobSpec.model_validate(MINIMAL_SPEC)
    return knob_space(spec, describe_model(spec))


@pytest.fixture
def views(monkeypatch: pytest.MonkeyPatch) -> list[FakeViews]:
    """Every LiveViews the callback opens, fake."""
    made: list[FakeViews] = []

    def make(rec: Any, views_dir: Path) -> FakeViews:
        made.append(FakeViews(rec, views_dir))
        return made[-1]

    monkeypatch.setattr(live, "LiveViews", make)
    return made


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The stopper's monotonic clock, moved by hand."""
    now = [100.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


@pytest.fixture
def store(settings: Settings) -> Iterator[st.JobStore]:
    s = st.JobStore(settings.db_url)
    yield s
    s.close()


@pytest.fixture
def job_id(store: st.JobStore) -> str:
    spec = JobSpec.model_validate(MINIMAL_SPEC).model_dump(mode="json")
    return store.create(spec).id


def _progress(
    settings: Settings, job_id: str, space: KnobSpace, task: str = "classification"
) -> JobProgress:
    return JobProgress(
        db_url=settings.db_url,
        job_id=job_id,
        space=space,
        baseline_size_bytes=BASELINE_SIZE,
        job_dir=str(settings.job_dir(job_id)),
        task=task,
    )


def _config(space: KnobSpace, seed: int = 0) -> dict[str, Any]:
    """A trial config as the searcher suggests one: a sample of the space's
    distributions."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return dict(study.ask(to_optuna(space)).params)


def _result(accuracy: float, size_bytes: int, **kw: Any) -> dict[str, Any]:
    return {
        "accuracy": accuracy,
        "loss": kw.pop("loss", 0.3),
        "size_bytes": size_bytes,
        "duration_s": 12.5,
        "baseline_accuracy": BASELINE_ACCURACY,
        "checkpoint_path": "/ckpt/trial.pt",
        "final": True,
        **kw,
    }


def _finish(cb: JobProgress, trial: FakeTrial) -> None:
    cb.on_trial_complete(0, [trial], trial)


def _records(cb: JobProgress) -> list[dict[str, Any]]:
    return [r for _, r in outbox.unsent(cb.outbox_root, outbox.DRIVER_STREAM, outbox.Cursor())]


def _tag_records(cb: JobProgress, trial_id: str) -> list[dict[str, str]]:
    key = tracking.trial_key(trial_id)
    return [
        r["tags"] for r in _records(cb) if r["op"] == "batch" and r["run"] == key and "tags" in r
    ]


def _last(cb: JobProgress, op: str, file: str) -> dict[str, Any]:
    return [r for r in _records(cb) if r["op"] == op and r["file"] == file][-1]


def test_a_completed_trial_is_recorded_counted_and_put_on_the_front(
    settings: Settings,
    store: st.JobStore,
    job_id: str,
    space: KnobSpace,
    views: list[FakeViews],
) -> None:
    """Number from the name, policy from the config, metrics, the run id the sender
    got; the job's counters and hypervolume; the front in the outbox; a snapshot."""
    cb = _progress(settings, job_id, space)
    config = _config(space)
    # the sender has created the trial's run already: its id goes with the row
    cb.outbox_root.mkdir(parents=True)
    outbox.State(ids={tracking.trial_key("t3"): "run-3"}).save(cb.outbox_root)
    _finish(
        cb,
        FakeTrial("t3", "trial-003", config, _result(0.9, 1000, bops=5e6, node_id="n1")),
    )

    t = store.trial(job_id, "t3")
    assert (t.status, t.number) == (st.TrialStatus.COMPLETED, 3)
    assert t.policy == policy_from_params(space, config).model_dump(mode="json")
    assert (t.accuracy, t.loss, t.size_bytes, t.duration_s) == (0.9, 0.3, 1000, 12.5)
    assert (t.bops, t.checkpoint, t.node_id, t.mlflow_run_id) == (
        5e6,
        "/ckpt/trial.pt",
        "n1",
        "run-3",
    )
    job = store.get(job_id)
    assert (job.trials_completed, job.trials_failed, job.front_size) == (1, 0, 1)
    # one point at (size 0.1, error 0.1) of the reference (1, 1)
    assert job.hypervolume == pytest.approx(0.81)

    table = _last(cb, "table", "pareto/front_table.json")
    assert table["run"] == tracking.PARENT
    [row] = table["rows"]
    assert (row["trial_id"], row["accuracy"], row["compression"]) == ("t3", 0.9, 10.0)
    assert {"noise_rate", "1.bits", "1.sparsity", "3.bits", "5.bits"} <= set(row)
    front = _last(cb, "dict", "pareto/front.json")["obj"]
    assert front["baseline"] == {
        "accuracy": BASELINE_ACCURACY,
        "loss": None,  # the trials' results here do not report it
        "quality": BASELINE_ACCURACY,  # classification: the front's axis is accuracy
        "size_bytes": BASELINE_SIZE,
    }
    assert (front["trials_finished"], front["hypervolume"]) == (1, pytest.approx(0.81))
    assert [r["trial_id"] for r in front["front"]] == ["t3"]
    assert _tag_records(cb, "t3") == [{"pareto": "true", "rank": "0"}]

    # the baseline accuracy is known and a trial completed: the views got a snapshot
    [v] = views
    [snap] = v.submitted
    assert snap.baseline_accuracy == BASELINE_ACCURACY
    assert [p.trial_id if p else None for p in snap.finished] == ["t3"]
    cb.close_views()
    assert v.closed


def test_a_run_id_the_sender_told_the_store_is_not_undone_by_the_trials_row(
    settings: Settings,
    store: st.JobStore,
    job_id: str,
    space: KnobSpace,
    views: list[FakeViews],
) -> None:
    """The sender (its own thread) tells the store a trial's run id between the
    callback's read of the outbox state (no id yet) and its write of the row: the
    row keeps the id (CI run of e85bfc1: a stopped trial had no run id)."""
    cb = _progress(settings, job_id, space)
    store.upsert_trial(job_id, "t1", number=1, status=st.TrialStatus.COMPLETED)
    store.update_trial(job_id, "t1", mlflow_run_id="run-1")  # the sender, first
    _finish(
        cb, FakeTrial("t1", "trial-001", _config(space), _result(0.9, 1000, final=False, epoch=1))
    )
    t = store.trial(job_id, "t1")
    assert (t.status, t.mlflow_run_id) == (st.TrialStatus.STOPPED, "run-1")


def test_the_views_wait_for_the_baseline_accuracy(
    settings: Settings, store: st.JobStore, job_id: str, space: KnobSpace, views: list[FakeViews]
) -> None:
    """The search starts while the baseline trains: the first results may not know
    its accuracy, and the views need it."""
    cb = _progress(settings, job_id, space)
    early = _result(0.9, 1000, baseline_accuracy=None)
    _finish(cb, FakeTrial("a", "trial-001", _config(space, 1), early))
    assert store.get(job_id).front_size == 1
    assert views == []
    front = _last(cb, "dict", "pareto/front.json")["obj"]
    assert front["baseline"] == {"accuracy": None, "loss": None, "size_bytes": BASELINE_SIZE}

    _finish(cb, FakeTrial("b", "trial-002", _config(space, 2), _result(0.8, 500)))
    [v] = views
    [snap] = v.submitted
    assert snap.baseline_accuracy == BASELINE_ACCURACY
    assert sorted(p.trial_id for p in snap.finished if p) == ["a", "b"]


def test_a_trial_that_reports_its_failure_is_recorded_failed_with_its_error(
    settings: Settings,
    store: st.JobStore,
    job_id: str,
    space: KnobSpace,
    views: list[FakeViews],
) -> None:
    cb = _progress(settings, job_id, space)
    config = _config(space)
    _finish(cb, FakeTrial("t1", "trial-001", config, {"failed": True, "error": "CUDA OOM"}))

    t = store.trial(job_id, "t1")
    assert (t.status, t.number, t.error) == (st.TrialStatus.FAILED, 1, "CUDA OOM")
    assert t.policy == policy_from_params(space, config).model_dump(mode="json")
    assert t.accuracy is None
    job = store.get(job_id)
    assert (job.trials_completed, job.trials_failed, job.front_size) == (0, 1, 0)
    assert job.hypervolume == 0.0
    assert views == []  # nothing completed: no views yet


def test_a_trial_error_is_the_last_line_of_its_error_file(
    settings: Settings, store: st.JobStore, job_id: str, space: KnobSpace, tmp_path: Path
) -> None:
    """A trial that raised: the exception's line, not the traceback; no file, a default."""
    cb = _progress(settings, job_id, space)
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: worker died\n\n'
    )
    trial = FakeTrial("t2", "trial-002", _config(space), error_file=str(error_file))
    cb.on_trial_error(0, [trial], trial)
    missing = FakeTrial("t4", "trial-004", {}, error_file=str(tmp_path / "gone.txt"))
    cb.on_trial_error(0, [missing], missing)

    assert store.trial(job_id, "t2").error == "RuntimeError: worker died"
    gone = store.trial(job_id, "t4")
    assert gone.error == "trial failed without an error message"
    assert gone.policy is None  # its config is no policy: recorded anyway
    assert store.get(job_id).trials_failed == 2


def test_a_trial_that_ended_without_a_result_is_failed(
    settings: Settings, store: st.JobStore, job_id: str, space: KnobSpace
) -> None:
    cb = _progress(settings, job_id, space)
    _finish(cb, FakeTrial("t5", "trial-005", _config(space), {"done": True}))
    _finish(cb, FakeTrial("t6", "trial-006", _config(space), None))

    for trial_id in ("t5", "t6"):
        t = store.trial(job_id, trial_id)
        assert (t.status, t.error) == (
            st.TrialStatus.FAILED,
            "trial ended without reporting a result",
        )
    assert store.get(job_id).trials_failed == 2


def test_a_trial_stopped_at_a_rung_is_kept_but_never_completed_nor_on_the_front(
    settings: Settings,
    store: st.JobStore,
    job_id: str,
    space: KnobSpace,
    views: list[FakeViews],
) -> None:
    """Its run is tagged stopped early and KILLED, with no pareto/rank tags."""
    cb = _progress(settings, job_id, space)
    _finish(
        cb, FakeTrial("t7", "trial-007", _config(space), _result(0.99, 100, final=False, epoch=2))
    )

    t = store.trial(job_id, "t7")
    assert (t.status, t.number, t.accuracy, t.size_bytes) == (st.TrialStatus.STOPPED, 7, 0.99, 100)
    assert t.error == "stopped early after fine-tune epoch 2 (not fully trained)"
    job = store.get(job_id)
    assert (job.trials_completed, job.trials_stopped, job.trials_failed) == (0, 1, 0)
    assert (job.front_size, job.hypervolume) == (0, 0.0)
    assert _last(cb, "dict", "pareto/front.json")["obj"]["front"] == []

    key = tracking.trial_key("t7")
    assert _tag_records(cb, "t7") == [{"sparq.stopped_early": "2"}]  # no pareto/rank tags
    assert [r["status"] for r in _records(cb) if r["op"] == "status" and r["run"] == key] == [
        "KILLED"
    ]
    assert cb.baseline_accuracy == BASELINE_ACCURACY  # learnt from it all the same
    assert views == []  # nothing completed


def test_the_front_leaves_out_a_dominated_trial_and_tags_only_changes(
    settings: Settings, store: st.JobStore, job_id: str, space: KnobSpace, views: list[FakeViews]
) -> None:
    """pareto/rank tags are written when a trial's standing changes, not every refresh."""
    cb = _progress(settings, job_id, space)
    _finish(cb, FakeTrial("a", "trial-001", _config(space, 1), _result(0.9, 1000)))
    _finish(cb, FakeTrial("b", "trial-002", _config(space, 2), _result(0.8, 500)))
    _finish(cb, FakeTrial("c", "trial-003", _config(space, 3), _result(0.7, 800)))  # under b

    job = store.get(job_id)
    assert (job.trials_completed, job.front_size) == (3, 2)
    # the union of the two points' boxes: 0.9 * 0.9 + 0.95 * 0.8 - 0.9 * 0.8
    assert job.hypervolume == pytest.approx(0.85)
    front = _last(cb, "dict", "pareto/front.json")["obj"]["front"]
    assert [r["trial_id"] for r in front] == ["b", "a"]  # smallest first
    assert [r["trial_id"] for r in _last(cb, "table", "pareto/front_table.json")["rows"]] == [
        "b",
        "a",
    ]
    tags = {t: _tag_records(cb, t) for t in "abc"}
    assert tags == {  # once each: a's and b's standing did not change as others came
        "a": [{"pareto": "true", "rank": "0"}],
        "b": [{"pareto": "true", "rank": "0"}],
        "c": [{"pareto": "false", "rank": "1"}],
    }

    cb._refresh()  # nothing new: no tags again
    assert {t: _tag_records(cb, t) for t in "abc"} == tags

    _finish(cb, FakeTrial("d", "trial-004", _config(space, 4), _result(0.95, 400)))  # over all
    assert store.get(job_id).front_size == 1
    assert _tag_records(cb, "a")[1:] == [{"pareto": "false", "rank": "1"}]
    assert _tag_records(cb, "b")[1:] == [{"pareto": "false", "rank": "1"}]
    assert _tag_records(cb, "c")[1:] == [{"pareto": "false", "rank": "2"}]
    assert _tag_records(cb, "d") == [{"pareto": "true", "rank": "0"}]
    assert len(views[0].submitted) == 5  # one snapshot per refresh


@pytest.mark.parametrize(
    ("task", "on_front"), [("classification", "accurate"), ("language_modeling", "low_loss")]
)
def test_the_front_follows_the_tasks_quality(
    settings: Settings,
    store: st.JobStore,
    job_id: str,
    space: KnobSpace,
    views: list[FakeViews],
    task: str,
    on_front: str,
) -> None:
    """Language modelling ranks by exp(-loss) (1 / perplexity), not token accuracy."""
    cb = _progress(settings, job_id, space, task=task)
    _finish(cb, FakeTrial("accurate", "trial-001", _config(space, 1), _result(0.6, 500, loss=2.0)))
    _finish(cb, FakeTrial("low_loss", "trial-002", _config(space, 2), _result(0.5, 500, loss=1.0)))

    assert store.get(job_id).front_size == 1
    [row] = _last(cb, "dict", "pareto/front.json")["obj"]["front"]
    assert row["trial_id"] == on_front
    assert _tag_records(cb, on_front)[-1] == {"pareto": "true", "rank": "0"}
    quality = math.exp(-1.0) if task == "language_modeling" else 0.6
    assert store.get(job_id).hypervolume == pytest.approx(0.95 * quality)


def test_the_stopper_stops_the_search_once_the_job_is_cancelled(
    settings: Settings, store: st.JobStore, job_id: str, clock: list[float]
) -> None:
    """Looked up at most twice a second; once it says stop, it keeps saying it."""
    stopper = JobStopper(settings.db_url, job_id)

    assert stopper("t1", {}) is False
    assert stopper.stop_all() is False
    store.update(job_id, cancel_requested=True)
    clock[0] += 0.2
    assert stopper.stop_all() is False  # looked less than half a second ago
    clock[0] += 0.4
    assert stopper("t1", {}) is True
    store.update(job_id, cancel_requested=False)
    clock[0] += 1.0
    assert stopper.stop_all() is True  # once stopping, always


def test_the_stopper_stops_the_search_once_the_job_has_an_error(
    settings: Settings, store: st.JobStore, job_id: str, clock: list[float]
) -> None:
    stopper = JobStopper(settings.db_url, job_id)
    assert stopper.stop_all() is False
    store.update(job_id, error="the float baseline failed to train: NaN loss")
    clock[0] += 0.6
    assert stopper.stop_all() is True


def test_the_stopper_stops_the_search_at_the_first_trial_that_found_no_baseline(
    settings: Settings, store: st.JobStore, job_id: str, clock: list[float]
) -> None:
    """Trials that find the baseline failed end at once; the search stops at the first
    such result, before the driver's watch has written the job's error."""
    stopper = JobStopper(settings.db_url, job_id)
    assert stopper("t1", {"failed": True, "error": "ValueError: a user error"}) is False
    assert stopper("t2", {"failed": True, "baseline_failed": True}) is True
    assert stopper.stop_all() is True
    assert store.get(job_id).error is None  # told by the trial, not the store


def test_callback_and_stopper_pickle_without_their_connections_and_work_after(
    settings: Settings,
    store: st.JobStore,
    job_id: str,
    space: KnobSpace,
    views: list[FakeViews],
    clock: list[float],
) -> None:
    """Tune pickles the run config: no store, recorder or views go with it, and the
    restored ones open their own and go on where the originals were."""
    cb = _progress(settings, job_id, space)
    _finish(cb, FakeTrial("a", "trial-001", _config(space, 1), _result(0.9, 1000)))
    stopper = JobStopper(settings.db_url, job_id)
    assert stopper.stop_all() is False
    assert {"_store", "_recorder", "_live"} <= set(vars(cb))
    assert "_store" in vars(stopper)

    cb2 = pickle.loads(pickle.dumps(cb))
    stopper2 = pickle.loads(pickle.dumps(stopper))

    assert not {"_store", "_recorder", "_live"} & set(vars(cb2))
    assert "_store" not in vars(stopper2)
    assert (cb2.space, cb2.baseline_accuracy, cb2.tagged) == (space, BASELINE_ACCURACY, cb.tagged)
    _finish(cb2, FakeTrial("b", "trial-002", _config(space, 2), _result(0.95, 400)))
    assert (store.get(job_id).trials_completed, store.get(job_id).front_size) == (2, 1)
    assert _tag_records(cb2, "a")[-1] == {"pareto": "false", "rank": "1"}
    assert len(views) == 2  # the restored callback opened views of its own
    store.update(job_id, cancel_requested=True)
    clock[0] += 1.0
    assert stopper2.stop_all() is True
