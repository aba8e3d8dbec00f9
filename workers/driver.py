"""The per-job search driver: ``python -m workers.driver JOB_ID``.

One process per job, started by the service's launcher. It joins (or starts) Ray,
trains the float baseline once in a Ray task, runs ``Tuner`` + ``OptunaSearch``
over both objectives, keeps the job store and MLflow current as trials finish,
then exports, reloads and re-evaluates the chosen point. It is the only writer of
a job's progress, trials and outcome; it never imports FastAPI.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ray import tune

from dashboards import FrontPoint, choose, non_dominated_ranks, sparq_front
from search_spaces import KnobSpace, policy_from_params, to_optuna
from service import store as st
from service.settings import Settings, get_settings
from service.spec import OBJECTIVE_MODES, JobSpec
from workers import tracking
from workers.trial import CHECKPOINT_FILE, TrialContext, run_trial, trial_name, trial_number

log = logging.getLogger("sparq.driver")
BEST_FILE = "best.sparq"


def train_baseline(spec_json: dict[str, Any]) -> dict[str, Any]:
    """Ray task: train the float model once; return its weights and measurements."""
    import torch

    from workers import checkpoint as ckpt
    from workers.data import build_datasets
    from workers.engine import compressible_layers
    from workers.models import build_model
    from workers.train import evaluate, make_loader, train_epochs
    from workers.trial import pick_device, set_threads

    spec = JobSpec.model_validate(spec_json)
    set_threads(spec.resources.cpus)
    device = pick_device(spec.resources.gpus)
    torch.manual_seed(spec.search.seed)
    model = build_model(spec.model)
    train, val = build_datasets(spec.dataset)
    losses = train_epochs(
        model,
        make_loader(train, spec.baseline.batch_size, shuffle=True, seed=spec.search.seed),
        epochs=spec.baseline.epochs,
        lr=spec.baseline.lr,
        device=device,
    )
    model.cpu()
    data = ckpt.encode(model, model_spec=spec.model, dataset_spec=spec.dataset, task=spec.task)
    result = evaluate(ckpt.decode(data).model, make_loader(val, 512, shuffle=False), device)
    return {
        "state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        "accuracy": result.accuracy,
        "loss": result.loss,
        "train_loss": losses[-1],
        "size_bytes": len(data),
        "layers": [info.model_dump() for info in compressible_layers(model)],
    }


def reevaluate(path: str, spec_json: dict[str, Any]) -> dict[str, float]:
    """Ray task: reload an exported checkpoint from disk and measure it again."""
    from workers import checkpoint as ckpt
    from workers.trial import evaluate_bytes, pick_device, set_threads

    spec = JobSpec.model_validate(spec_json)
    set_threads(spec.resources.cpus)
    data = Path(path).read_bytes()
    ckpt.decode(data)  # validates the header before anything else
    result = evaluate_bytes(data, spec, pick_device(spec.resources.gpus))
    return {"accuracy": result.accuracy, "loss": result.loss, "size_bytes": len(data)}


def make_sampler(spec: JobSpec) -> Any:
    import optuna

    seed = spec.search.seed
    if spec.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=min(10, spec.search.trials // 3 + 1),
    )


class _Lazy:
    """Ray pickles the run config (stopper, callbacks) with the experiment state, so
    these hold only plain values and open their store and MLflow client lazily."""

    _unpicklable = ("_store", "_client")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._unpicklable}

    @property
    def store(self) -> st.JobStore:
        if getattr(self, "_store", None) is None:
            self._store = st.JobStore(self.db_url)
        return self._store

    @property
    def client(self) -> Any:
        if getattr(self, "_client", None) is None:
            self._client = tracking.client(self.tracking_uri)
        return self._client

    db_url: str
    tracking_uri: str


class CancelStopper(_Lazy, tune.Stopper):
    """Ends the whole search once a cancel is requested (checked twice a second)."""

    def __init__(self, db_url: str, job_id: str) -> None:
        self.db_url, self.job_id = db_url, job_id
        self.last, self.seen = 0.0, False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self.seen and now - self.last > 0.5:
            self.last = now
            self.seen = self.store.get(self.job_id).cancel_requested
        return self.seen


class JobProgress(_Lazy, tune.Callback):
    """Records each finished trial and keeps the front, the job store and MLflow
    current. Runs in the driver process."""

    def __init__(
        self,
        *,
        db_url: str,
        job_id: str,
        space: KnobSpace,
        baseline_size_bytes: int,
        baseline_accuracy: float,
        tracking_uri: str,
        parent_run_id: str,
    ) -> None:
        self.db_url, self.job_id, self.space = db_url, job_id, space
        self.baseline_size_bytes, self.baseline_accuracy = baseline_size_bytes, baseline_accuracy
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.tagged: dict[str, tuple[bool, int]] = {}  # run id -> (on front, rank) as tagged

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if "accuracy" not in result:  # ended without reporting: count it as failed
            self.failed(
                trial.trial_id,
                trial_name(trial),
                trial.config,
                "trial ended without reporting a result",
            )
            return
        ck = trial.checkpoint
        self.completed(
            trial.trial_id, trial_name(trial), trial.config, result, ck.path if ck else None
        )

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.failed(trial.trial_id, trial_name(trial), trial.config, _trial_error(trial))

    def completed(
        self,
        trial_id: str,
        name: str,
        config: dict[str, Any],
        result: dict[str, Any],
        ckpt_dir: str | None,
    ) -> None:
        policy = policy_from_params(self.space, config)
        self.store.upsert_trial(
            self.job_id,
            trial_id,
            number=trial_number(name),
            status=st.TRIAL_COMPLETED,
            policy=policy.model_dump(mode="json"),
            accuracy=float(result["accuracy"]),
            loss=float(result["loss"]),
            size_bytes=int(result["size_bytes"]),
            bops=result.get("bops"),
            relative_bops=result.get("relative_bops"),
            duration_s=float(result.get("duration_s", 0.0)),
            checkpoint=str(Path(ckpt_dir) / CHECKPOINT_FILE) if ckpt_dir else None,
            mlflow_run_id=result.get("mlflow_run_id"),
            finished_at=st.utcnow(),
        )
        self._refresh()

    def failed(self, trial_id: str, name: str, config: dict[str, Any], error: str) -> None:
        try:
            policy = policy_from_params(self.space, config).model_dump(mode="json")
        except (KeyError, ValueError):  # the config itself may be what failed
            policy = None
        self.store.upsert_trial(
            self.job_id,
            trial_id,
            number=trial_number(name),
            status=st.TRIAL_FAILED,
            policy=policy,
            error=error,
            finished_at=st.utcnow(),
        )
        self._refresh()

    def _refresh(self) -> None:
        trials = self.store.trials(self.job_id)
        done = [t for t in trials if t.status == st.TRIAL_COMPLETED]
        points = [FrontPoint(t.trial_id, t.accuracy or 0.0, t.size_bytes or 0) for t in done]
        front = sparq_front(points, self.baseline_size_bytes)
        self.store.update(
            self.job_id,
            trials_completed=len(done),
            trials_failed=sum(t.status == st.TRIAL_FAILED for t in trials),
            front_size=len(front.points),
            hypervolume=front.hypervolume,
        )
        self._log_front(done, front.points, front.hypervolume, len(trials))

    def _log_front(self, done: list[st.Trial], front: list[FrontPoint], hv: float, n: int) -> None:
        c = self.client
        metrics = {"hypervolume": hv, "front_size": len(front)}
        tracking.log_metrics(c, self.parent_run_id, metrics, step=n)
        rows = [
            {
                "trial_id": p.trial_id,
                "accuracy": p.accuracy,
                "size_bytes": p.size_bytes,
                "compression": self.baseline_size_bytes / p.size_bytes,
            }
            for p in front
        ]
        baseline = {"accuracy": self.baseline_accuracy, "size_bytes": self.baseline_size_bytes}
        by_id = {t.trial_id: t for t in done}
        table = [{**row, **_policy_columns(by_id[str(row["trial_id"])].policy)} for row in rows]
        c.log_table(self.parent_run_id, data=_frame(table), artifact_file="pareto/front_table.json")
        c.log_dict(
            self.parent_run_id,
            {"baseline": baseline, "hypervolume": hv, "front": rows},
            "pareto/front.json",
        )
        ranks = non_dominated_ranks([(t.size_bytes or 0, -(t.accuracy or 0.0)) for t in done])
        members = {p.trial_id for p in front}
        for t, rank in zip(done, ranks, strict=True):
            state = (t.trial_id in members, rank)
            if t.mlflow_run_id and self.tagged.get(t.mlflow_run_id) != state:
                tags = {"pareto": str(state[0]).lower(), "rank": rank}
                tracking.set_tags(c, t.mlflow_run_id, tags)  # only what changed: O(changes)
                self.tagged[t.mlflow_run_id] = state


def _policy_columns(policy: dict[str, Any] | None) -> dict[str, Any]:
    """A policy as flat table columns: one bits and one sparsity column per layer."""
    if not policy:
        return {}
    cols: dict[str, Any] = {"noise_rate": policy.get("noise_rate")}
    for name, lp in policy.get("layers", {}).items():
        cols[f"{name}.bits"] = lp["bits"]
        cols[f"{name}.sparsity"] = round(lp["sparsity"], 4)
    return cols


def _frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows)


def _trial_error(trial: Any) -> str:
    """The last line of the trial's exception (the full traceback is in its log)."""
    text = ""
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            text = Path(trial.error_file).read_text()
    except OSError:
        pass
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "trial failed without an error message")[:2000]


def _init_ray(settings: Settings, spec: JobSpec) -> None:
    import ray

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **kwargs)
    else:
        # address="local": always a fresh local Ray; without it ray.init() joins any Ray
        # already running on this machine (another job's, a test's) and then refuses
        # num_cpus
        cpus = settings.ray_num_cpus or os.cpu_count() or 1
        ray.init(address="local", num_cpus=cpus, **kwargs)
    res = ray.cluster_resources()
    need = {"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}
    for key, field in (("CPU", "resources.cpus"), ("GPU", "resources.gpus")):
        if need[key] > res.get(key, 0.0):
            raise ValueError(
                f"{field}={need[key]} but the Ray cluster has {res.get(key, 0.0)} {key}s in all; "
                "no trial could ever be scheduled"
            )


def run_search(store: st.JobStore, settings: Settings, job_id: str) -> None:
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    job = store.get(job_id)
    spec = JobSpec.model_validate(job.spec)
    job_dir = settings.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)

    c = tracking.client(settings.mlflow_tracking_uri)
    experiment_id = tracking.experiment_for(c, spec.name)
    parent = c.create_run(experiment_id, run_name=f"job-{job_id}", tags={"sparq.job_id": job_id})
    parent_id = parent.info.run_id
    store.update(job_id, mlflow_experiment_id=experiment_id, mlflow_run_id=parent_id)
    tracking.log_params(c, parent_id, tracking.flatten(spec.model_dump(mode="json")))

    try:
        _init_ray(settings, spec)
        log.info("training the float baseline")
        baseline = ray.get(
            ray.remote(train_baseline)
            .options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
            .remote(spec.model_dump(mode="json"))
        )
        store.update(
            job_id,
            baseline_accuracy=baseline["accuracy"],
            baseline_loss=baseline["loss"],
            baseline_size_bytes=baseline["size_bytes"],
        )
        tracking.log_metrics(
            c, parent_id, {f"baseline_{k}": baseline[k] for k in ("accuracy", "loss", "size_bytes")}
        )
        ss = spec.search_space
        space = KnobSpace.model_validate(
            {
                "layers": baseline["layers"],
                "weight_bits": ss.weight_bits,
                "sparsity_low": ss.sparsity.low,
                "sparsity_high": ss.sparsity.high,
                "noise_rate_low": ss.noise_rate.low,
                "noise_rate_high": ss.noise_rate.high,
                "noise_block": ss.noise_block,
                "methods": ss.methods,
                "granularities": ss.granularity,
                "symmetric": ss.symmetric,
                "ipq_blocks": ss.ipq.block_sizes,
                "ipq_centroids": ss.ipq.centroids,
                "mx_elements": ss.mx_element,
                "order": ss.order,
                "act_bits": ss.activation.bits,
                "act_range": ss.activation.range,
                "geta": ss.geta.model_dump(),
                "geta_sparsity_low": ss.geta_sparsity_range.low,
                "geta_sparsity_high": ss.geta_sparsity_range.high,
            }
        )
        c.log_dict(parent_id, space.model_dump(mode="json"), "search_space.json")

        ctx = TrialContext(
            job_id=job_id,
            spec=spec.model_dump(mode="json"),
            space=space.model_dump(mode="json"),
            baseline_state=baseline["state"],
            tracking_uri=settings.mlflow_tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=parent_id,
        )
        progress = JobProgress(
            db_url=settings.db_url,
            job_id=job_id,
            space=space,
            baseline_size_bytes=baseline["size_bytes"],
            baseline_accuracy=baseline["accuracy"],
            tracking_uri=settings.mlflow_tracking_uri,
            parent_run_id=parent_id,
        )
        searcher = OptunaSearch(
            space=to_optuna(space),
            metric=list(spec.objectives),
            mode=[OBJECTIVE_MODES[o] for o in spec.objectives],
            sampler=make_sampler(spec),
        )
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, ctx=ctx),
            {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus},
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=spec.search.trials,
                max_concurrent_trials=spec.search.concurrency,
                time_budget_s=spec.search.time_budget_s,
                reuse_actors=True,
                trial_name_creator=trial_name,
                trial_dirname_creator=lambda t: f"{trial_name(t)}_{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(job_dir),
                stop=CancelStopper(settings.db_url, job_id),
                callbacks=[progress],
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
        tuner.fit()
        _finish(store, job_id, spec, baseline, job_dir, c, parent_id)
    except BaseException as e:
        c.set_tag(parent_id, "sparq.error", f"{type(e).__name__}: {e}"[:5000])
        c.set_terminated(parent_id, "FAILED")
        raise
    c.set_terminated(
        parent_id, "KILLED" if store.get(job_id).status == st.CANCELLED else "FINISHED"
    )


def _finish(
    store: st.JobStore,
    job_id: str,
    spec: JobSpec,
    baseline: dict[str, Any],
    job_dir: Path,
    c: Any,
    parent_id: str,
) -> None:
    import ray

    cancelled = store.get(job_id).cancel_requested
    done = [t for t in store.trials(job_id) if t.status == st.TRIAL_COMPLETED]
    points = [FrontPoint(t.trial_id, t.accuracy or 0.0, t.size_bytes or 0) for t in done]
    best = choose(
        points,
        baseline_accuracy=baseline["accuracy"],
        baseline_size_bytes=baseline["size_bytes"],
        rule=spec.export.choose,
        max_accuracy_drop=spec.constraints.max_accuracy_drop,
        max_size_bytes=spec.constraints.max_size_bytes,
    )
    final = st.CANCELLED if cancelled else st.SUCCEEDED
    failed = [t for t in store.trials(job_id) if t.status == st.TRIAL_FAILED]
    if not done and failed and not cancelled:
        raise RuntimeError(f"all {len(failed)} trials failed; the first: {failed[0].error}")
    if best is None:
        msg = (
            f"no completed trial met the constraints {spec.constraints.model_dump()}"
            if done
            else "no trial completed"
        )
        store.update(job_id, status=final, message=msg, finished_at=st.utcnow())
        return
    trial = next(t for t in done if t.trial_id == best.trial_id)
    if not trial.checkpoint or not Path(trial.checkpoint).exists():
        raise RuntimeError(f"trial {best.trial_id} has no checkpoint on disk at {trial.checkpoint}")
    out = job_dir / BEST_FILE
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(trial.checkpoint, tmp)
    tmp.replace(out)
    again = ray.get(
        ray.remote(reevaluate)
        .options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
        .remote(str(out), spec.model_dump(mode="json"))
    )
    if again["size_bytes"] != best.size_bytes or abs(again["accuracy"] - best.accuracy) > 1e-9:
        raise RuntimeError(
            f"exported checkpoint does not reproduce trial {best.trial_id}: reported "
            f"(accuracy={best.accuracy}, size_bytes={best.size_bytes}), reloaded {again}"
        )
    tracking.log_metrics(
        c,
        parent_id,
        {
            "best_accuracy": again["accuracy"],
            "best_size_bytes": again["size_bytes"],
            "best_compression": baseline["size_bytes"] / again["size_bytes"],
        },
    )
    tracking.set_tags(c, parent_id, {"sparq.best_trial_id": best.trial_id})
    c.log_artifact(parent_id, str(out))
    store.update(
        job_id,
        status=final,
        best_trial_id=best.trial_id,
        best_accuracy=again["accuracy"],
        best_size_bytes=again["size_bytes"],
        best_checkpoint=str(out),
        finished_at=st.utcnow(),
        message="search cancelled; exported the best of the finished trials" if cancelled else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.driver")
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    store = st.JobStore(settings.db_url)
    job_id = args.job_id
    if not store.transition(
        job_id, {st.QUEUED}, status=st.RUNNING, started_at=st.utcnow(), driver_pid=os.getpid()
    ):
        log.error(
            "job %s is not queued (status %s); nothing to do", job_id, store.get(job_id).status
        )
        return 2
    try:
        run_search(store, settings, job_id)
    except BaseException as e:  # recorded, never swallowed: the job says why it failed
        traceback.print_exc()
        store.update(
            job_id,
            status=st.FAILED,
            error=f"{type(e).__name__}: {e}"[:5000],
            finished_at=st.utcnow(),
        )
        return 1
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:  # pragma: no cover - shutdown noise must not mask the outcome
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
