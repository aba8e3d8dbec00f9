"""One trial as Ray Tune runs it (the function trainable): its number and name, the
baseline fetched from Ray's object store, :func:`workers.jobs.trial.compress` run with
its checkpoint and result kept on disk (a rerun reports them instead of training again),
its MLflow run recorded through its own outbox stream, and its own failure reported
as a result (Tune retries only failures of the system)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dashboards import quality
from search_spaces import KnobSpace, policy_from_params
from service.secrets import known_secrets, scrub
from service.settings import get_settings
from service.spec import JobSpec
from workers.compress.train import evaluate, make_loader, pick_device, set_threads
from workers.errors import last_line
from workers.jobs import checkpoint as ckpt
from workers.jobs.baseline import EVAL_BATCH, Baseline, teacher_for
from workers.jobs.trial import (
    CHECKPOINT_FILE,
    OUTBOX_DIR,
    REPORTED,
    RESULT_FILE,
    RESULTS_DIR,
    compress,
)
from workers.search import tracking
from workers.search.scheduler import milestones
from workers.zoo.data import build_datasets


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a job shares; put in Ray's object store once."""

    job_id: str
    spec: dict[str, Any]
    space: dict[str, Any]
    baseline: Any  # ObjectRef of a workers.jobs.baseline.Baseline (may be training)
    job_dir: str  # results and the outbox go here (a path every node shares)


@dataclass(frozen=True)
class TrialNames:
    """Ray Tune ``trial_name_creator``: ``trial-<number>``, the k-th trial of this
    driver's search (its 1-based tag) taking the k-th number no kept trial holds, so
    a job's trials are numbered 1..N whatever restarts the search had."""

    taken: frozenset[int] = frozenset()

    def number(self, trial: Any) -> int:
        head = str(trial.experiment_tag).split("_", 1)[0]
        if not head.isdigit():
            return 0
        k, n = int(head), 0
        while k:
            n += 1
            k -= n not in self.taken
        return n

    def __call__(self, trial: Any) -> str:
        return f"trial-{self.number(trial):03d}"


def trial_number(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class BaselineUnavailable(RuntimeError):
    """The float baseline every trial starts from failed to train."""


def fetch_baseline(ref: Any) -> Baseline:
    """The shared float baseline, from Ray's object store. The search starts while it
    trains, so the first trials wait here for it (holding their CPUs: the driver has
    reserved the baseline's own before starting the search)."""
    import ray

    try:
        baseline: Baseline = ray.get(ref)
    except ray.exceptions.RayError as e:
        why = last_line(str(e), repr(e))
        raise BaselineUnavailable(f"the float baseline failed to train: {why}") from None
    return baseline


_BUILTIN_DATA: dict[str, tuple[Any, Any]] = {}


def trial_datasets(spec: JobSpec) -> tuple[Any, Any]:
    """The job's ``(train, val)``, built once per trial (the rungs' evaluation and
    :func:`compress` share them). A builtin dataset is also kept for the next trial this
    worker runs (Tune reuses its actors): it is fixed data, never changed by a trial. A
    dataset of the user's code is built for every trial, as it always was: it may
    hold state a trial changes."""
    if not spec.dataset.builtin:
        return build_datasets(spec.dataset)
    key = spec.dataset.model_dump_json()
    if key not in _BUILTIN_DATA:
        _BUILTIN_DATA.clear()  # one job's data at a time
        _BUILTIN_DATA[key] = build_datasets(spec.dataset)
    return _BUILTIN_DATA[key]


def _replay(results: Path) -> dict[str, Any] | None:
    """What an earlier attempt of this trial measured, if it finished: a trial Tune
    runs again (its driver died after the trial ended but before Tune saved that)
    reports it instead of training again."""
    try:
        metrics = json.loads((results / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not REPORTED <= metrics.keys() or not (results / CHECKPOINT_FILE).is_file():
        return None
    return dict(metrics)


def _keep(results: Path, data: bytes, metrics: dict[str, Any]) -> Path:
    """The trial's checkpoint and metrics in the job directory (the shared storage
    path the driver reads), the metrics last: their presence means both are whole."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / CHECKPOINT_FILE
    ckpt.save(path, data)
    tmp = results / f"{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(metrics))
    tmp.replace(results / RESULT_FILE)
    return path


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: reports at early-stopping rungs, then once with the
    checkpoint's path. Every report carries the baseline's accuracy for the driver.

    A trial that fails in its own work (the policy, the model, training) reports the
    failure as its final result: Tune's retries are kept for failures of the system
    (a worker or node that died), which the same trial survives when run again."""
    from ray import get_runtime_context, tune

    trial_id = tune.get_context().get_trial_id()
    name = tune.get_context().get_trial_name()
    job_dir = Path(ctx.job_dir)
    results = job_dir / RESULTS_DIR / trial_id
    node = {"node_id": get_runtime_context().get_node_id()}
    replayed = _replay(results)
    if replayed is not None:
        ck = str(results / CHECKPOINT_FILE)
        tune.report({**replayed, **node, "checkpoint_path": ck, "replayed": True, "final": True})
        return
    rec = tracking.Recorder(job_dir / OUTBOX_DIR, tracking.trial_stream(trial_id))
    run = tracking.trial_key(trial_id)
    tags = {"sparq.job_id": ctx.job_id, "sparq.trial_id": trial_id}
    rec.run(run, name, tags, parent=tracking.PARENT)  # once: a rerun finds it
    rec.status(run, "RUNNING")
    rec.tags(run, {"sparq.node_id": node["node_id"]})  # per attempt: a retry may move
    started = time.perf_counter()
    told: dict[str, Any] = {}
    try:
        baseline = fetch_baseline(ctx.baseline)
        told["baseline_accuracy"] = float(baseline.accuracy)
        if baseline.loss is not None:  # the quality axis of a language model
            told["baseline_loss"] = float(baseline.loss)
        spec = JobSpec.model_validate(ctx.spec)
        set_threads(spec.resources.cpus)
        device = pick_device(spec.resources.gpus)
        number = trial_number(name)
        torch.manual_seed(spec.search.seed * 100_003 + number)
        policy = policy_from_params(KnobSpace.model_validate(ctx.space), config)
        rec.params(run, policy.summary())
        rec.log_dict(run, policy.model_dump(mode="json"), "policy.json")  # the full policy
        train, val = trial_datasets(spec)
        ss = spec.search_space
        es = spec.search.early_stopping
        rungs = set(milestones(ss.finetune_epochs, es.grace_epochs, es.reduction_factor))
        # Rungs only where the model in eval mode is the model exported (the method
        # says: iPQ quantizes after its fine-tuning epochs, GETA counts steps).
        rungs = rungs if es.enabled and policy.method.reports_at_rungs else set()
        val_loader = make_loader(val, EVAL_BATCH, shuffle=False)
        held: dict[str, Any] = {}

        def on_model(model: torch.nn.Module, encode_now: Callable[[], bytes]) -> None:
            held["model"] = model
            if rungs:  # the policy fixes the checkpoint's size; fine-tuning changes values
                held["size"] = len(encode_now())

        def on_epoch(epoch: int, loss: float) -> None:
            rec.metrics(run, {"train_loss": loss}, epoch)
            if epoch + 1 in rungs:  # a rung of the early-stopping scheduler
                model = held["model"]
                if "teacher" not in held:  # distillation: the float model (else None)
                    held["teacher"] = teacher_for(spec, baseline.state)
                # every block quantized
                r = evaluate(model, val_loader, device, spec.task, held["teacher"])
                model.train()
                rec.metrics(run, {"rung_accuracy": r.accuracy}, epoch + 1)
                tune.report(
                    {
                        **r.metrics(spec.task),  # the objective too, as Tune expects
                        "quality": quality(spec.task, {"accuracy": r.accuracy, "loss": r.loss}),
                        "size_bytes": held["size"],
                        "epoch": epoch + 1,
                        "final": False,
                        "duration_s": time.perf_counter() - started,
                        **told,
                        **node,
                    }
                )

        meta = {"job_id": ctx.job_id, "trial_id": trial_id}
        data, metrics = compress(
            spec,
            policy,
            baseline.state,
            device,
            seed=number,
            on_epoch=on_epoch,
            on_model=on_model,
            meta=meta,
            datasets=(train, val),
        )
        metrics["duration_s"] = time.perf_counter() - started
        metrics["quality"] = quality(spec.task, metrics)  # the front's axis, as at rungs
        path = _keep(results, data, {**metrics, **told})
    except SystemExit as e:
        if e.code in (0, None):
            # Tune ends a trial it stopped (early stopping, cancel) with sys.exit(0)
            # in the trial's next report: not a failure.
            rec.status(run, "KILLED")
        raise
    except Exception as e:  # the trial's own failure: its final result says so
        # user code's error may quote what this worker can read (the Ray token)
        why = scrub(f"{type(e).__name__}: {e}", known_secrets(get_settings()))
        rec.tags(run, {"sparq.error": why[:5000]})
        rec.status(run, "FAILED")
        failed = {"failed": True, "error": last_line(why, why)[:2000], "final": True}
        if isinstance(e, BaselineUnavailable):
            failed["baseline_failed"] = True  # JobStopper ends the search at once
        tune.report({**failed, **told})
        return
    rec.metrics(run, metrics)
    rec.artifact(run, path)
    rec.status(run, "FINISHED")
    tune.report({**metrics, **told, **node, "checkpoint_path": str(path), "final": True})
