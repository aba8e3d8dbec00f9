"""The driver's data flow without a cluster: set-up (what is left of a resumed job,
what MLflow is told), the search's outcome, the export (the point chosen, copied and
measured again; a mismatch refused) and the outcome recorded, against fakes for the
recorder, the views and the re-measurement. Plus the typed results the baseline
module hands the driver (and Ray): their JSON and pickles."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import store as st
from service.settings import Settings
from service.spec import JobSpec
from workers.jobs.baseline import (
    Baseline,
    ModelDescription,
    Reevaluation,
    describe_model,
    knob_space,
    load_saved_baseline,
    reevaluate,
    save_baseline,
)
from workers.search.driver import (
    BEST_FILE,
    BaselineSource,
    Export,
    Remaining,
    SearchOutcome,
    SetUp,
    export,
    record_outcome,
    set_up,
)

SPEC: dict[str, Any] = {
    "name": "flow",
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 16}},
    "dataset": {"builtin": "digits"},
    "search": {"trials": 4},
    "constraints": {"max_accuracy_drop": None},
}
NO_DROP = {"max_accuracy_drop": None}  # the trials' accuracies are far below the baseline's
FITS_800 = {**NO_DROP, "max_size_bytes": 800}
FITS_100 = {**NO_DROP, "max_size_bytes": 100}
BASELINE = Baseline(
    state={"w": np.zeros((2, 2), dtype=np.float32)},
    accuracy=0.95,
    quality=0.95,
    loss=0.2,
    train_loss=0.3,
    warm_start=None,
    size_bytes=4000,
)


class FakeRecorder:
    """Stands in for ``tracking.Recorder``: keeps every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.calls.append((name, a, k))

    def named(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for n, a, k in self.calls if n == name]


@dataclass
class FakeViews:
    ended: list[Any] = field(default_factory=list)

    def end(self, final: Any = None) -> None:
        self.ended.append(final)


@dataclass
class FakeProgress:
    views: FakeViews = field(default_factory=FakeViews)


@pytest.fixture(scope="module")
def model() -> ModelDescription:
    return describe_model(JobSpec.model_validate(SPEC))


def _trial(trial_id: str, number: int, status: str = "completed", **fields: Any) -> st.Trial:
    return st.Trial(trial_id=trial_id, number=number, status=status, **fields)


def _setup(job_dir: Path, model: ModelDescription, job: st.Job | None = None, **spec: Any) -> SetUp:
    js = JobSpec.model_validate({**SPEC, **spec})
    job_dir.mkdir(parents=True, exist_ok=True)
    return SetUp(
        job=job or st.Job(id="j1", spec=js.model_dump(mode="json")),
        spec=js,
        spec_json=js.model_dump(mode="json"),
        job_dir=job_dir,
        baseline=BaselineSource("REF"),
        left=Remaining(4, frozenset(), None),
        model=model,
        space=knob_space(js, model),
        resume=False,
    )


def _with_checkpoints(tmp_path: Path) -> list[st.Trial]:
    """Two completed trials with their checkpoint files, and a failed one."""
    trials = []
    for tid, n, acc, size in (("a", 1, 0.9, 1000), ("b", 2, 0.8, 500)):
        path = tmp_path / "results" / tid / "model.sparq"
        path.parent.mkdir(parents=True)
        path.write_bytes(f"checkpoint of {tid}".encode())
        trials.append(_trial(tid, n, accuracy=acc, loss=0.5, size_bytes=size, checkpoint=str(path)))
    trials[-1].policy = {"layers": {"fc1": {"bits": 4}}}
    return [*trials, _trial("c", 3, "failed", error="CUDA OOM")]


def _measured(accuracy: float, size_bytes: int) -> Reevaluation:
    return Reevaluation(
        accuracy=accuracy,
        loss=0.5,
        size_bytes=size_bytes,
        info_size_bytes=float(size_bytes),
        info_header_bytes=100.0,
        info_bound_bytes=400.0,
        info_ratio=size_bytes / 400.0,
    )


def _unmeasured(path: Path, spec: JobSpec) -> Reevaluation:
    raise AssertionError(f"{path} was measured: nothing should have been exported")


# -- set-up -------------------------------------------------------------------


def test_set_up_of_a_resumed_job_keeps_the_stored_trials_and_says_the_spec_once(
    tmp_path: Path, model: ModelDescription
) -> None:
    started = st.utcnow() - timedelta(seconds=100)
    spec = {**SPEC, "search": {"trials": 4, "time_budget_s": 600}}
    job = st.Job(id="j1", spec=spec, started_at=started)
    kept = [_trial("a", 1), _trial("b", 3, "failed")]
    rec = FakeRecorder()
    saved = BaselineSource("REF", saved=BASELINE)  # a resumed driver's: its run has the spec
    setup = set_up(job, tmp_path, saved, kept, rec, resume=True)
    assert (setup.left.trials, setup.left.taken) == (2, frozenset({1, 3}))
    assert setup.left.time_budget_s is not None
    assert 400 <= setup.left.time_budget_s <= 500.5  # 100 s of 600 spent (and the set-up)
    assert (setup.job_id, setup.spec.name, setup.resume) == ("j1", "flow", True)
    assert setup.model == model  # the untrained model's description
    assert setup.space == knob_space(setup.spec, model)
    assert rec.named("params") == []
    logged = [(a[2], a[1]) for a, _ in rec.named("log_dict")]
    assert logged == [
        ("pruning_report.json", model.pruning_report),
        ("layers_adjusted.json", model.adjusted),
        ("search_space.json", setup.space.model_dump(mode="json")),
    ]

    fresh = FakeRecorder()  # a first driver: the spec goes on the run as its params
    first = set_up(
        st.Job(id="j2", spec=SPEC), tmp_path, BaselineSource("REF"), [], fresh, resume=False
    )
    assert first.left == Remaining(4, frozenset(), None)
    ((args, _),) = fresh.named("params")
    assert args[1]["search.trials"] == 4


# -- the search's outcome -----------------------------------------------------


def test_the_outcome_fails_only_when_every_trial_failed_and_no_cancel_came() -> None:
    failed = [_trial("a", 1, "failed", error="boom"), _trial("b", 2, "failed", error="bang")]
    outcome = SearchOutcome(BASELINE, failed, cancelled=False)
    assert outcome.failure == "all 2 trials failed; the first: boom"
    assert outcome.status == st.JobStatus.SUCCEEDED
    cancelled = SearchOutcome(BASELINE, failed, cancelled=True)
    assert cancelled.failure is None
    assert cancelled.status == st.JobStatus.CANCELLED
    some = SearchOutcome(BASELINE, [*failed, _trial("c", 3)], cancelled=False)
    assert some.failure is None
    assert [t.trial_id for t in some.completed] == ["c"]
    assert SearchOutcome(BASELINE, [], cancelled=False).failure is None  # nothing ran


# -- export -------------------------------------------------------------------


def test_export_copies_the_chosen_point_and_measures_the_copy(
    tmp_path: Path, model: ModelDescription
) -> None:
    setup = _setup(tmp_path / "job", model, constraints=FITS_800)
    outcome = SearchOutcome(BASELINE, _with_checkpoints(tmp_path), cancelled=False)
    seen: list[tuple[Path, bytes]] = []

    def measure(path: Path, spec: JobSpec) -> Reevaluation:
        seen.append((path, path.read_bytes()))
        return _measured(0.8, 500)

    exported = export(setup, outcome, measure=measure)
    assert exported is not None
    assert exported.trial.trial_id == "b"  # a (1000 bytes) is over the size constraint
    assert (exported.point.accuracy, exported.point.size_bytes) == (0.8, 500)
    assert exported.checkpoint == setup.job_dir / BEST_FILE
    assert seen == [(setup.job_dir / BEST_FILE, b"checkpoint of b")]  # the copy is measured
    assert exported.onnx is None
    assert not (setup.job_dir / "best.tmp").exists()


@pytest.mark.parametrize(("accuracy", "size_bytes"), [(0.8, 501), (0.8 - 1e-6, 500), (0.81, 500)])
def test_export_refuses_a_copy_that_does_not_reproduce_its_trial(
    tmp_path: Path, model: ModelDescription, accuracy: float, size_bytes: int
) -> None:
    setup = _setup(tmp_path / "job", model, constraints=FITS_800)
    outcome = SearchOutcome(BASELINE, _with_checkpoints(tmp_path), cancelled=False)
    with pytest.raises(RuntimeError, match="does not reproduce trial b"):
        export(setup, outcome, measure=lambda p, s: _measured(accuracy, size_bytes))


def test_export_of_no_feasible_point_is_none_and_writes_nothing(
    tmp_path: Path, model: ModelDescription
) -> None:
    setup = _setup(tmp_path / "job", model, constraints=FITS_100)
    outcome = SearchOutcome(BASELINE, _with_checkpoints(tmp_path), cancelled=False)
    assert export(setup, outcome, measure=_unmeasured) is None
    assert not (setup.job_dir / BEST_FILE).exists()


def test_export_of_a_point_whose_checkpoint_is_gone_fails(
    tmp_path: Path, model: ModelDescription
) -> None:
    setup = _setup(tmp_path / "job", model, export={"choose": "max_accuracy"})
    trials = _with_checkpoints(tmp_path)
    Path(trials[0].checkpoint or "").unlink()
    outcome = SearchOutcome(BASELINE, trials, cancelled=False)
    with pytest.raises(RuntimeError, match="trial a has no checkpoint on disk"):
        export(setup, outcome, measure=_unmeasured)


# -- the outcome recorded -----------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = st.JobStore(Settings(home=tmp_path / "home", database_url=None).prepare().db_url)
    yield s
    s.close()


def _claimed(store: st.JobStore, **spec: Any) -> st.Job:
    job = store.create(JobSpec.model_validate({**SPEC, **spec}).model_dump(mode="json"))
    assert store.transition(job.id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING)
    return store.get(job.id)


def test_the_outcome_is_recorded_once_with_the_measured_copy_then_mlflow_is_told(
    tmp_path: Path, model: ModelDescription, store: st.JobStore
) -> None:
    job = _claimed(store, constraints=FITS_800)
    setup = _setup(tmp_path / "job", model, job, constraints=FITS_800)
    outcome = SearchOutcome(BASELINE, _with_checkpoints(tmp_path), cancelled=False)
    exported = export(setup, outcome, measure=lambda p, s: _measured(0.8, 500))
    rec, progress = FakeRecorder(), FakeProgress()
    record_outcome(store, setup, outcome, exported, rec, progress)  # type: ignore[arg-type]

    row = store.get(job.id)
    assert row.status == st.JobStatus.SUCCEEDED
    assert row.message is None
    assert (row.best_trial_id, row.best_accuracy, row.best_size_bytes) == ("b", 0.8, 500)
    assert row.best_checkpoint == str(setup.job_dir / BEST_FILE)
    assert row.finished_at is not None
    (final,) = progress.views.ended
    assert final.chosen_trial_id == "b"
    assert "final" in final.title
    ((metrics, _),) = rec.named("metrics")
    assert metrics[1] == {
        "best_accuracy": 0.8,
        "best_size_bytes": 500,
        "best_compression": 8.0,
        "best_info_bound_bytes": 400.0,
        "best_bytes_over_bound": 1.25,
    }
    assert rec.named("tags") == [(("parent", {"sparq.best_trial_id": "b"}), {})]
    assert rec.named("log_dict")[0][0][1:] == (
        {"layers": {"fc1": {"bits": 4}}},
        "model/policy.json",
    )
    ((_, register),) = rec.named("register")
    assert register["name"] == "sparq-flow"
    assert register["tags"] == {
        "sparq.job_id": job.id,
        "sparq.trial_id": "b",
        "accuracy": 0.8,
        "size_bytes": 500,
    }


def test_a_cancelled_search_records_its_export_as_cancelled(
    tmp_path: Path, model: ModelDescription, store: st.JobStore
) -> None:
    job = _claimed(store)
    setup = _setup(tmp_path / "job", model, job, export={"choose": "max_accuracy"})
    outcome = SearchOutcome(BASELINE, _with_checkpoints(tmp_path), cancelled=True)
    exported = export(setup, outcome, measure=lambda p, s: _measured(0.9, 1000))
    assert isinstance(exported, Export)
    assert exported.trial.trial_id == "a"
    record_outcome(store, setup, outcome, exported, FakeRecorder(), FakeProgress())  # type: ignore[arg-type]
    row = store.get(job.id)
    assert row.status == st.JobStatus.CANCELLED
    assert row.best_trial_id == "a"
    assert row.message == "search cancelled; exported the best of the finished trials"


def test_no_point_to_export_is_said_and_nothing_goes_to_mlflow(
    tmp_path: Path, model: ModelDescription, store: st.JobStore
) -> None:
    job = _claimed(store, constraints=FITS_100)
    setup = _setup(tmp_path / "job", model, job, constraints=FITS_100)
    outcome = SearchOutcome(BASELINE, _with_checkpoints(tmp_path), cancelled=False)
    rec, progress = FakeRecorder(), FakeProgress()
    record_outcome(store, setup, outcome, None, rec, progress)  # type: ignore[arg-type]
    row = store.get(job.id)
    assert row.status == st.JobStatus.SUCCEEDED
    assert row.best_trial_id is None
    assert row.message is not None
    assert row.message.startswith("no completed trial met the constraints")
    assert rec.calls == []
    assert progress.views.ended[0].chosen_trial_id is None

    nothing = replace(outcome, trials=[_trial("c", 3, "failed", error="x")], cancelled=True)
    record_outcome(store, setup, nothing, None, rec, progress)  # type: ignore[arg-type]
    row = store.get(job.id)
    assert (row.status, row.message) == (st.JobStatus.CANCELLED, "no trial completed")
    assert len(progress.views.ended) == 1  # no views without a completed trial


# -- what the baseline module hands over --------------------------------------


def test_a_kept_baseline_reads_back_equal_with_the_json_it_always_had(tmp_path: Path) -> None:
    import json

    save_baseline(tmp_path, BASELINE)
    meta = json.loads((tmp_path / "baseline.json").read_text())
    assert meta == {
        "accuracy": 0.95,
        "quality": 0.95,
        "loss": 0.2,
        "train_loss": 0.3,
        "warm_start": None,
        "size_bytes": 4000,
    }
    back = load_saved_baseline(tmp_path)
    assert back is not None
    assert back.meta() == BASELINE.meta()
    assert np.array_equal(back.state["w"], BASELINE.state["w"])
    assert load_saved_baseline(tmp_path / "none") is None


def test_the_results_crossing_ray_pickle(model: ModelDescription) -> None:
    for value in (BASELINE, model, _measured(0.8, 500)):
        again = pickle.loads(pickle.dumps(value))
        assert type(again) is type(value)
    assert pickle.loads(pickle.dumps(model)) == model
    assert pickle.loads(pickle.dumps(_measured(0.8, 500))) == _measured(0.8, 500)


def test_reevaluate_measures_a_checkpoint_file(tmp_path: Path) -> None:
    from workers.jobs import checkpoint as ckpt
    from workers.zoo.models import build_model

    spec = JobSpec.model_validate(SPEC)
    data = ckpt.encode(
        build_model(spec.model), model_spec=spec.model, dataset_spec=spec.dataset, task=spec.task
    )
    (tmp_path / "m.sparq").write_bytes(data)
    again = reevaluate(str(tmp_path / "m.sparq"), spec.model_dump(mode="json"))
    assert again.size_bytes == len(data) == again.info_size_bytes
    assert 0.0 <= again.accuracy <= 1.0
    assert again.loss > 0
    assert again.info_ratio == pytest.approx(len(data) / again.info_bound_bytes)
    assert set(again.as_dict()) == {
        "accuracy",
        "loss",
        "size_bytes",
        "info_size_bytes",
        "info_header_bytes",
        "info_bound_bytes",
        "info_ratio",
    }


def test_tracking_close_tells_the_store_every_run_id_of_the_outbox(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial row written after the sender told the store of its run (the row did
    not exist then, the told id was lost) gets the id when the job's tracking closes."""
    from workers.search import outbox, tracking
    from workers.search.driver import Tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = settings.model_copy(update={"mlflow_tracking_uri": "http://127.0.0.1:9"})
    store = st.JobStore(settings.db_url)
    job_id = store.create(JobSpec.model_validate(SPEC).model_dump(mode="json")).id
    job_dir = settings.job_dir(job_id)
    tr = Tracking(store, settings, job_id, job_dir)
    ids = {"experiment": "7", "parent": "run-p", tracking.trial_key("t1"): "run-1"}
    outbox.State(ids=ids).save(tr.root)  # as the sender left it
    store.upsert_trial(job_id, "t1", number=1, status=st.TrialStatus.COMPLETED)
    tr.close(drain_s=0)
    job, trial = store.get(job_id), store.trial(job_id, "t1")
    assert (job.mlflow_experiment_id, job.mlflow_run_id, trial.mlflow_run_id) == (
        "7",
        "run-p",
        "run-1",
    )
    store.close()
