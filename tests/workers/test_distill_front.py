"""A distillation job's front speaks cosine everywhere: the progress callback (live
views, MLflow's front.json), the REST pareto view and the CLI's pick, the sampler's
constraint (Optuna is told the ``cosine`` objective) and the driver's export all rank by
the similarity to the float model, with the constraint in cosine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient

from search_spaces import to_optuna
from service import store as st
from service.settings import Settings
from service.spec import OBJECTIVE_MODES, JobSpec
from service.views import current_choice
from tests.workers.test_lm_front import _config, _Recorder, _Trial, _Views
from tests.workers.test_lm_front import client as client  # the fixture
from workers.jobs.baseline import Baseline, Reevaluation, describe_model, knob_space
from workers.search import driver, live, outbox
from workers.search.progress import JobProgress
from workers.search.sampling import ConstrainedOptunaSearch, make_sampler

SPEC: dict[str, Any] = {
    "name": "distill-front",
    "model": {
        "entrypoint": "tests.held:token_encoder",
        "kwargs": {"classify": False},
        "pretrained": True,
    },
    "dataset": {"entrypoint": "tests.held:token_dicts"},
    "task": "distillation",
    "constraints": {"max_accuracy_drop": 0.05},
    "export": {"choose": "min_size"},
    "search": {"trials": 3},
}
BASELINE = {"accuracy": 1.0, "loss": 0.0, "size_bytes": 40_000}  # the teacher itself
TRIALS = {  # trial id -> (cosine, loss 1 - cosine, size)
    "far": (0.90, 0.10, 1_000),  # 0.10 below the teacher: infeasible
    "near": (0.96, 0.04, 1_500),  # feasible, the smallest such
    "big": (0.99, 0.01, 3_000),  # feasible, larger
}
LABEL = "similarity to the float model (cosine; agreement for logits)"


def _result(trial_id: str, job_dir: Path) -> dict[str, Any]:
    cosine, loss, size = TRIALS[trial_id]
    ckpt = job_dir / "results" / trial_id / "model.sparq"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(trial_id)
    return {
        "cosine": cosine,
        "accuracy": cosine,
        "loss": loss,
        "size_bytes": size,
        "duration_s": 1.0,
        "baseline_accuracy": BASELINE["accuracy"],
        "baseline_loss": BASELINE["loss"],
        "checkpoint_path": str(ckpt),
        "final": True,
    }


def test_the_front_views_constraint_and_export_of_a_distillation_job_speak_cosine(
    settings: Settings,
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = JobSpec.model_validate(SPEC)
    assert spec.objectives == ["cosine", "size_bytes"]
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    store = st.JobStore(settings.db_url)
    store.update(
        job_id,
        status=st.JobStatus.RUNNING,
        baseline_accuracy=BASELINE["accuracy"],
        baseline_loss=BASELINE["loss"],
        baseline_size_bytes=BASELINE["size_bytes"],
    )
    job_dir = settings.job_dir(job_id)
    space = knob_space(spec, describe_model(spec))
    monkeypatch.setattr(live, "LiveViews", _Views)
    cb = JobProgress(
        db_url=settings.db_url,
        job_id=job_id,
        space=space,
        baseline_size_bytes=BASELINE["size_bytes"],
        job_dir=str(job_dir),
        task=spec.task,
    )
    results = {t: _result(t, job_dir) for t in TRIALS}
    for n, (trial_id, result) in enumerate(results.items(), start=1):
        trial = _Trial(trial_id, n, _config(space), result)
        cb.on_trial_complete(0, [trial], trial)

    snap = cb.views.snaps[-1]  # type: ignore[attr-defined]
    assert snap.chosen_trial_id == "near"
    assert snap.quality_label == LABEL
    front = [
        r
        for _, r in outbox.unsent(cb.outbox_root, outbox.DRIVER_STREAM, outbox.Cursor())
        if r["op"] == "dict" and r["file"] == "pareto/front.json"
    ][-1]["obj"]
    assert front["quality_label"] == LABEL
    assert {r["trial_id"]: r["quality"] for r in front["front"]}["near"] == 0.96

    pareto = client.get(f"/v1/jobs/{job_id}/pareto").json()
    assert pareto["quality_label"] == LABEL
    assert pareto["accuracy_label"] == "cosine"  # the CLI table names its column so
    assert current_choice(client.get(f"/v1/jobs/{job_id}").json(), pareto) == "near"

    searcher = ConstrainedOptunaSearch(
        space=to_optuna(space),
        metric=list(spec.objectives),
        mode=[OBJECTIVE_MODES[o] for o in spec.objectives],
        sampler=make_sampler(spec, len(to_optuna(space))),
        spec=spec,
    )
    for trial_id, result in results.items():
        assert searcher.suggest(trial_id) is not None
        searcher.on_trial_complete(trial_id, result)
    told = dict(zip(results, searcher._ot_study.trials, strict=True))
    assert told["near"].values == [0.96, 1_500]  # the cosine objective, maximized
    feasible = optuna.study._constrained_optimization._get_feasible_trials(list(told.values()))
    assert {t for t, ot in told.items() if ot in feasible} == {"near", "big"}
    assert told["far"].constraints["max_accuracy_drop"] == pytest.approx(1.0 - 0.90 - 0.05)

    def measure(path: Path, _spec: JobSpec) -> Reevaluation:
        r = results[Path(path).read_text()]
        return Reevaluation(
            accuracy=r["accuracy"],
            loss=r["loss"],
            size_bytes=r["size_bytes"],
            info_size_bytes=float(r["size_bytes"]),
            info_header_bytes=0.0,
            info_bound_bytes=1.0,
            info_ratio=1.0,
        )

    model = describe_model(spec)
    setup = driver.SetUp(
        job=store.get(job_id),
        spec=spec,
        spec_json=spec.model_dump(mode="json"),
        job_dir=job_dir,
        baseline=driver.BaselineSource("REF"),
        left=driver.Remaining(len(TRIALS), frozenset(), None),
        model=model,
        space=knob_space(spec, model),
        resume=False,
    )
    baseline = Baseline(
        state={},
        accuracy=1.0,
        quality=1.0,
        loss=0.0,
        train_loss=None,
        warm_start=None,
        size_bytes=BASELINE["size_bytes"],
    )
    outcome = driver.SearchOutcome(baseline, store.trials(job_id), cancelled=False)
    exported = driver.export(setup, outcome, measure=measure)
    driver.record_outcome(store, setup, outcome, exported, _Recorder(), cb)
    assert store.get(job_id).best_trial_id == "near"
    store.close()
