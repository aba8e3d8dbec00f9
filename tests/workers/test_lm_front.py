"""A language-modelling job's front means one thing everywhere: the same trial records
fed through the progress callback (live views), the REST pareto view and the CLI's
current pick, the sampler's constraint and the driver's export pick the same trial,
on exp(-loss), even where token accuracy would pick another.

The trials are made so the two axes disagree: ``acc`` keeps token accuracy (1 point
below the float baseline) but its likelihood drops far past the allowed 0.05, and
``lik`` loses 20 points of token accuracy but stays within 0.05 of the baseline's
exp(-loss). With ``min_size`` the pick is the smallest feasible trial: ``acc`` on
token accuracy, ``lik`` on the task's quality axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient

from dashboards import FrontPoint, choose
from search_spaces import KnobSpace, to_optuna
from service import store as st
from service.api import create_app
from service.settings import Settings
from service.spec import OBJECTIVE_MODES, JobSpec
from service.views import current_choice
from workers.jobs.baseline import Baseline, Reevaluation, describe_model, knob_space
from workers.search import driver, live, outbox
from workers.search.progress import JobProgress
from workers.search.sampling import ConstrainedOptunaSearch, make_sampler

LM_SPEC = {
    "name": "lm-front",
    "model": {"builtin": "char-lm", "kwargs": {"dim": 16, "depth": 1}},
    "dataset": {"builtin": "python-text", "kwargs": {"max_chars": 4000}},
    "task": "language_modeling",
    "constraints": {"max_accuracy_drop": 0.05},
    "export": {"choose": "min_size"},
    "search": {"trials": 3},
}
BASELINE = {"accuracy": 0.60, "loss": 1.0, "size_bytes": 40_000}  # quality exp(-1) = 0.368
TRIALS = {  # trial id -> (token accuracy, loss, size): quality exp(-loss)
    "acc": (0.59, 1.50, 1_000),  # quality 0.223: 0.145 below the baseline's, infeasible
    "lik": (0.40, 1.10, 1_500),  # quality 0.333: 0.035 below, feasible
    "big": (0.58, 1.05, 3_000),  # quality 0.350: feasible, but larger
}


class _Views:
    """The live views without a renderer: what was handed over."""

    def __init__(self, *_: Any) -> None:
        self.snaps: list[live.Snapshot] = []

    def submit(self, snap: live.Snapshot) -> None:
        self.snaps.append(snap)

    def end(self, snap: live.Snapshot) -> None:
        self.snaps.append(snap)

    def close(self) -> None:
        pass


class _Recorder:
    """Takes the driver's MLflow records and keeps none."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **kw: None


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, launch=False), raise_server_exceptions=False) as c:
        yield c


def _config(space: KnobSpace) -> dict[str, Any]:
    """A trial config as the searcher would suggest one: a sample of the space."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return dict(study.ask(to_optuna(space)).params)


class _Trial:
    def __init__(self, trial_id: str, number: int, config: dict[str, Any], result: Any) -> None:
        self.trial_id, self.config, self.last_result = trial_id, config, result
        self.name, self.error_file = f"trial-{number:03d}", None

    def __str__(self) -> str:
        return self.name


def _result(trial_id: str, job_dir: Path) -> dict[str, Any]:
    accuracy, loss, size = TRIALS[trial_id]
    ckpt = job_dir / "results" / trial_id / "model.sparq"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(trial_id)  # what the fake re-evaluation reads back
    return {
        "accuracy": accuracy,
        "loss": loss,
        "perplexity": math.exp(loss),
        "size_bytes": size,
        "duration_s": 1.0,
        "baseline_accuracy": BASELINE["accuracy"],
        "baseline_loss": BASELINE["loss"],
        "checkpoint_path": str(ckpt),
        "final": True,
    }


def test_live_view_cli_pick_constraint_and_export_agree_for_a_language_model(
    settings: Settings, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = JobSpec.model_validate(LM_SPEC)
    job_id = client.post("/v1/jobs", json=LM_SPEC).json()["id"]
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

    # the fixture discriminates: on token accuracy the pick would be another trial
    by_accuracy = choose(
        [FrontPoint(t, a, s) for t, (a, _, s) in TRIALS.items()],
        baseline_accuracy=BASELINE["accuracy"],
        baseline_size_bytes=BASELINE["size_bytes"],
        rule="min_size",
        max_accuracy_drop=0.05,
    )
    assert by_accuracy is not None
    assert by_accuracy.trial_id == "acc"

    # live views: the rule's pick now, on exp(-loss), labelled as such
    snap = cb.views.snaps[-1]  # type: ignore[attr-defined]
    assert snap.chosen_trial_id == "lik"
    assert snap.baseline_accuracy == pytest.approx(math.exp(-1.0))
    assert snap.quality_label == "exp(-loss) (per-token likelihood)"
    plotted = {p.trial_id: p.accuracy for p in snap.finished if p is not None}
    assert plotted == pytest.approx({t: math.exp(-loss) for t, (_, loss, _) in TRIALS.items()})

    # MLflow's front.json: the quality axis named, token accuracy kept as accuracy
    front = [
        r
        for _, r in outbox.unsent(cb.outbox_root, outbox.DRIVER_STREAM, outbox.Cursor())
        if r["op"] == "dict" and r["file"] == "pareto/front.json"
    ][-1]["obj"]
    assert front["quality_label"] == "exp(-loss) (per-token likelihood)"
    assert (
        front["hypervolume_reference"]["objectives"][1] == "1 - exp(-loss) (per-token likelihood)"
    )
    assert front["baseline"]["quality"] == pytest.approx(math.exp(-1.0))
    rows = {r["trial_id"]: r for r in front["front"]}
    assert rows["lik"]["accuracy"] == 0.40
    assert rows["lik"]["quality"] == pytest.approx(math.exp(-1.1))

    # the CLI: the REST views it reads, and the pick it marks
    pareto = client.get(f"/v1/jobs/{job_id}/pareto").json()
    assert pareto["quality_label"] == "exp(-loss) (per-token likelihood)"
    assert pareto["baseline"]["quality"] == pytest.approx(math.exp(-1.0))
    assert current_choice(client.get(f"/v1/jobs/{job_id}").json(), pareto) == "lik"

    # the sampler's constraints, as the searcher tells Optuna: feasible exactly where
    # the export's floor says so
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
    feasible = optuna.study._constrained_optimization._get_feasible_trials(list(told.values()))
    assert {t for t, ot in told.items() if ot in feasible} == {"lik", "big"}
    assert told["acc"].constraints["max_accuracy_drop"] == pytest.approx(
        math.exp(-1.0) - math.exp(-1.5) - 0.05
    )

    # the export: the driver's own choice, re-measured by a fake that reads back the
    # trial's (fake) checkpoint and answers what the trial reported
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
        accuracy=BASELINE["accuracy"],
        quality=math.exp(-BASELINE["loss"]),
        loss=BASELINE["loss"],
        train_loss=None,
        warm_start=None,
        size_bytes=BASELINE["size_bytes"],
    )
    outcome = driver.SearchOutcome(baseline, store.trials(job_id), cancelled=False)
    exported = driver.export(setup, outcome, measure=measure)
    driver.record_outcome(store, setup, outcome, exported, _Recorder(), cb)
    job = store.get(job_id)
    assert (job.status, job.best_trial_id) == (st.JobStatus.SUCCEEDED, "lik")
    assert cb.views.snaps[-1].chosen_trial_id == "lik"  # type: ignore[attr-defined]
    store.close()
