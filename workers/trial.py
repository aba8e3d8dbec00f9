"""One trial: apply a policy to the shared float baseline (sparsity first, then
quantization), fine-tune under quantization noise, export the checkpoint, and
measure the checkpoint itself: accuracy of the decoded, fully quantized model and
its exact size in bytes."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dashboards import quality
from search_spaces import KnobSpace, Policy, policy_from_params
from service.secrets import known_secrets, scrub
from service.settings import get_settings
from service.spec import JobSpec
from workers import checkpoint as ckpt
from workers import quant, tracking
from workers.baseline import EVAL_BATCH, Baseline, job_model, load_baseline
from workers.data import build_datasets, example_input
from workers.errors import last_line
from workers.scheduler import milestones
from workers.train import evaluate, make_loader, pick_device, set_threads

CHECKPOINT_FILE = "model.sparq"
RESULT_FILE = "result.json"
RESULTS_DIR = "results"  # jobs/JOB/results/TRIAL_ID/{model.sparq,result.json}
OUTBOX_DIR = "outbox"  # jobs/JOB/outbox: see workers/outbox.py
REPORTED = frozenset({"accuracy", "loss", "size_bytes", "duration_s"})  # a trial's metrics


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a job shares; put in Ray's object store once."""

    job_id: str
    spec: dict[str, Any]
    space: dict[str, Any]
    baseline: Any  # ObjectRef of a workers.baseline.Baseline (may be training)
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


def compress(
    spec: JobSpec,
    policy: Policy,
    baseline_state: dict[str, np.ndarray],
    device: torch.device,
    *,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
    on_model: Callable[[torch.nn.Module, Callable[[], bytes]], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, float]]:
    """A trial's work without Ray or MLflow: prune channels (structured, first), apply
    the policy's method to the survivors, fine-tune as the method says, export, and
    measure the decoded checkpoint. Returns the checkpoint bytes and the metrics
    (accuracy, loss, perplexity, size_bytes, information bound, params, BOPs).

    ``on_model(model, encode_now)`` sees the wrapped model before it is trained, with
    a function that exports it as it stands."""
    train, val = build_datasets(spec.dataset)
    example = example_input(train)
    model = load_baseline(spec, baseline_state)
    pruning: list[dict[str, Any]] = []
    if policy.channels:  # structured first: quantizers are attached to the survivors
        from workers.pruning import prune_channels

        # N:M groups, noise blocks and the method's own (iPQ's sub-vectors) tile the
        # surviving channels
        multiple = math.lcm(4, policy.noise_block, policy.method.channel_multiple())
        pruning = prune_channels(model, policy.channels, example, multiple_of=multiple)
    model = quant.apply(model, policy)

    def encode_now() -> bytes:
        return ckpt.encode(
            model.cpu(),
            model_spec=spec.model,
            dataset_spec=spec.dataset,
            task=spec.task,
            policy=policy,
            meta=meta or {},
            pruning=pruning,
            example=example,
        )

    if on_model is not None:
        on_model(model, encode_now)
    ss = spec.search_space
    learned = quant.finetune(
        model,
        policy,
        make_loader(train, spec.baseline.batch_size, shuffle=True, seed=seed),
        epochs=ss.finetune_epochs,
        lr=ss.finetune_lr,
        device=device,
        on_epoch=on_epoch,
        seed=seed,
        task=spec.task,
    )
    cost = quant.count_bops(model, example)
    data = encode_now()
    decoded = ckpt.decode(data, model=job_model(spec)).model  # an entrypoint: from the spec
    result = evaluate(decoded, make_loader(val, EVAL_BATCH, shuffle=False), device, spec.task)
    bound = ckpt.size_report(data)
    metrics = {
        "accuracy": result.accuracy,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "size_bytes": len(data),
        "info_bound_bytes": bound["bound_bytes"],
        "bytes_over_bound": bound["ratio"],
        "params": sum(p.numel() for p in decoded.parameters()),
        "bops": cost.bops,
        "relative_bops": cost.relative,
    }
    if "geta_trace" in learned:
        metrics["group_sparsity"] = learned["geta_trace"].group_sparsity
    return data, metrics


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
        _, val = build_datasets(spec.dataset)
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
                r = evaluate(model, val_loader, device, spec.task)  # every block quantized
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
        tune.report({"failed": True, "error": last_line(why, why)[:2000], "final": True, **told})
        return
    rec.metrics(run, metrics)
    rec.artifact(run, path)
    rec.status(run, "FINISHED")
    tune.report({**metrics, **told, **node, "checkpoint_path": str(path), "final": True})
