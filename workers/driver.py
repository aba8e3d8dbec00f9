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
import warnings
from pathlib import Path
from typing import Any

from ray import tune

from dashboards import FrontPoint, choose, non_dominated_ranks, sparq_front
from search_spaces import KnobSpace, policy_from_params, to_optuna
from service import store as st
from service.settings import Settings, get_settings
from service.spec import OBJECTIVE_MODES, JobSpec, front_quality
from workers import live, tracking
from workers.baseline import load_saved_baseline, reevaluate, save_baseline, train_baseline
from workers.sampling import ConstrainedOptunaSearch, make_sampler, resolve_sampler
from workers.scheduler import ParetoHalving
from workers.trial import CHECKPOINT_FILE, TrialContext, run_trial, trial_name, trial_number

__all__ = ["main", "make_sampler", "reevaluate", "run_search", "train_baseline"]

log = logging.getLogger("sparq.driver")
BEST_FILE = "best.sparq"
OPTUNA_JOURNAL = "optuna.journal"  # optuna-dashboard opens it (see the README)
BEST_ONNX_FILE = "best.onnx"


def _quality(task: str, accuracy: float | None, loss: float | None) -> float:
    return front_quality(task, accuracy, loss)


def export_onnx(path: str, out: str, spec_json: dict[str, Any]) -> dict[str, float]:
    """Ray task: the exported checkpoint as an int8 QDQ ONNX model, checked against torch
    in onnxruntime on validation inputs."""
    from workers import checkpoint as ckpt
    from workers.data import build_datasets
    from workers.onnx_export import export_qdq

    spec = JobSpec.model_validate(spec_json)
    _, val = build_datasets(spec.dataset)
    xs = [val[i][0] for i in range(min(64, len(val)))]  # type: ignore[arg-type]
    import torch

    report = export_qdq(ckpt.load_checkpoint(path), out, torch.stack(xs))
    return {
        "rel_diff": report.rel_diff,
        "rel_diff_optimized": report.rel_diff_optimized,
        "top1_agreement": report.top1_agreement,
        "bytes": float(report.size_bytes),
    }


class _Lazy:
    """Ray pickles the run config (stopper, callbacks) with the experiment state, so
    these hold only plain values and open their store and MLflow client lazily."""

    _unpicklable: tuple[str, ...] = ("_store", "_client")

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
        task: str = "classification",
    ) -> None:
        self.task = task
        self.db_url, self.job_id, self.space = db_url, job_id, space
        self.baseline_size_bytes, self.baseline_accuracy = baseline_size_bytes, baseline_accuracy
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.tagged: dict[str, tuple[bool, int]] = {}  # run id -> (on front, rank) as tagged

    _unpicklable = (*_Lazy._unpicklable, "_live")

    @property
    def views(self) -> live.LiveViews:
        """Plots on the parent run, rendered off the Tune loop (workers/live.py)."""
        if getattr(self, "_live", None) is None:
            self._live = live.LiveViews(self.tracking_uri, self.parent_run_id)
        return self._live

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if getattr(self, "_live", None) is not None:
            self._live.close()

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
        if result.get("final") is False:  # stopped early by the scheduler at a rung
            self.stopped(trial.trial_id, trial_name(trial), trial.config, result)
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

    def stopped(
        self, trial_id: str, name: str, config: dict[str, Any], result: dict[str, Any]
    ) -> None:
        """A trial early stopping ended: kept with what it measured at its last rung,
        but never a point of the front nor a candidate for export."""
        self.store.upsert_trial(
            self.job_id,
            trial_id,
            number=trial_number(name),
            status=st.TRIAL_STOPPED,
            policy=policy_from_params(self.space, config).model_dump(mode="json"),
            accuracy=float(result["accuracy"]),
            loss=float(result["loss"]),
            size_bytes=int(result["size_bytes"]),
            duration_s=float(result.get("duration_s", 0.0)),
            error=f"stopped early after fine-tune epoch {result['epoch']} (not fully trained)",
            mlflow_run_id=result.get("mlflow_run_id"),
            finished_at=st.utcnow(),
        )
        if result.get("mlflow_run_id"):
            run_id = str(result["mlflow_run_id"])
            tracking.set_tags(self.client, run_id, {"sparq.stopped_early": result["epoch"]})
            self.client.set_terminated(run_id, "KILLED")
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
        points = [
            FrontPoint(t.trial_id, _quality(self.task, t.accuracy, t.loss), t.size_bytes or 0)
            for t in done
        ]
        front = sparq_front(points, self.baseline_size_bytes)
        self.store.update(
            self.job_id,
            trials_completed=len(done),
            trials_failed=sum(t.status == st.TRIAL_FAILED for t in trials),
            trials_stopped=sum(t.status == st.TRIAL_STOPPED for t in trials),
            front_size=len(front.points),
            hypervolume=front.hypervolume,
        )
        self._log_front(done, front.points, front.hypervolume, len(trials))
        if done:
            self.views.submit(
                live.snapshot(
                    self.store.get(self.job_id),
                    trials,
                    baseline_accuracy=self.baseline_accuracy,
                    baseline_size_bytes=self.baseline_size_bytes,
                )
            )

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
        tracking.replace_table(c, self.parent_run_id, _frame(table), "pareto/front_table.json")
        c.log_dict(
            self.parent_run_id,
            {
                "baseline": baseline,
                "trials_finished": n,
                "hypervolume": hv,
                "hypervolume_reference": _HV_REFERENCE,
                "front": rows,
            },
            "pareto/front.json",
        )
        ranks = non_dominated_ranks(
            [(t.size_bytes or 0, -_quality(self.task, t.accuracy, t.loss)) for t in done]
        )
        members = {p.trial_id for p in front}
        for t, rank in zip(done, ranks, strict=True):
            state = (t.trial_id in members, rank)
            if t.mlflow_run_id and self.tagged.get(t.mlflow_run_id) != state:
                tags = {"pareto": str(state[0]).lower(), "rank": rank}
                tracking.set_tags(c, t.mlflow_run_id, tags)  # only what changed: O(changes)
                self.tagged[t.mlflow_run_id] = state


_HV_REFERENCE = {
    "objectives": ["size_bytes / baseline size_bytes", "1 - accuracy"],
    "minimized": True,
    "point": [1.0, 1.0],
}


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
        # address='local': a new local Ray even when `ray start` left a cluster on this host
        ray.init(address="local", num_cpus=settings.ray_num_cpus or os.cpu_count() or 1, **kwargs)
    res = ray.cluster_resources()
    need = {"CPU": spec.resources.cpus, "GPU": spec.resources.gpus}
    for key, field in (("CPU", "resources.cpus"), ("GPU", "resources.gpus")):
        if need[key] > res.get(key, 0.0):
            raise ValueError(
                f"{field}={need[key]} but the Ray cluster has {res.get(key, 0.0)} {key}s in all; "
                "no trial could ever be scheduled"
            )


def _optuna_storage(path: Path) -> Any:
    """The job's Optuna study in a journal file (append-only, file-locked), which
    ``optuna-dashboard PATH`` opens while the search runs or after."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def _label_study(storage: Any, study_name: str, spec: JobSpec, job_id: str) -> None:
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    with warnings.catch_warnings():  # set_metric_names is "experimental" since Optuna 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(spec.objectives))
    study.set_user_attr("sparq_job_id", job_id)
    study.set_user_attr("sparq_job_name", spec.name)


def run_search(
    store: st.JobStore, settings: Settings, job_id: str, *, resume: bool = False
) -> None:
    import ray
    from ray import tune

    job = store.get(job_id)
    spec = JobSpec.model_validate(job.spec)
    job_dir = settings.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)

    c = tracking.client(settings.mlflow_tracking_uri)
    tune_dir = job_dir / "tune"
    restore = resume and tune.Tuner.can_restore(str(tune_dir))
    if resume and job.mlflow_run_id:  # the same parent run, baseline and Tune experiment
        experiment_id, parent_id = str(job.mlflow_experiment_id), str(job.mlflow_run_id)
        c.update_run(parent_id, status="RUNNING")
        log.info("resuming job %s (%s)", job_id, f"from {tune_dir}" if restore else "afresh")
    else:
        experiment_id = tracking.experiment_for(c, spec.name)
        parent = c.create_run(
            experiment_id, run_name=f"job-{job_id}", tags={"sparq.job_id": job_id}
        )
        parent_id = parent.info.run_id
        store.update(job_id, mlflow_experiment_id=experiment_id, mlflow_run_id=parent_id)

    try:
        _init_ray(settings, spec)
        baseline = load_saved_baseline(job_dir) if resume else None
        if baseline is None:
            log.info("training the float baseline")
            baseline_ref = (
                ray.remote(train_baseline)
                .options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
                .remote(spec.model_dump(mode="json"))
            )
            # While the baseline trains in a Ray worker:
            tracking.log_params(c, parent_id, tracking.flatten(spec.model_dump(mode="json")))
            baseline = ray.get(baseline_ref)
            save_baseline(job_dir, baseline)  # a resumed driver starts from it, not again
            store.update(
                job_id,
                baseline_accuracy=baseline["accuracy"],
                baseline_loss=baseline["loss"],
                baseline_size_bytes=baseline["size_bytes"],
            )
            tracking.log_metrics(
                c,
                parent_id,
                {f"baseline_{k}": baseline[k] for k in ("accuracy", "loss", "size_bytes")},
            )
        ss = spec.search_space
        c.log_dict(parent_id, baseline["pruning_report"], "pruning_report.json")
        space = ss.knob_space(baseline["layers"], baseline["pruning_report"]["groups"])
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
            task=spec.task,
        )
        storage = _optuna_storage(job_dir / OPTUNA_JOURNAL)
        dists = to_optuna(space)
        sampler = resolve_sampler(spec, len(dists))
        log.info(
            "sampler %s (search.sampler=%s, %d knobs)", sampler, spec.search.sampler, len(dists)
        )
        tracking.log_params(c, parent_id, {"sampler.resolved": sampler})
        searcher = ConstrainedOptunaSearch(
            space=dists,
            metric=list(spec.objectives),
            mode=[OBJECTIVE_MODES[o] for o in spec.objectives],
            sampler=make_sampler(spec, len(dists)),
            spec=spec,
            baseline_accuracy=baseline["accuracy"],
            study_name=f"sparq-{job_id}",
            storage=storage,
        )
        _label_study(storage, f"sparq-{job_id}", spec, job_id)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, ctx=ctx),
            {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus},
        )
        es = spec.search.early_stopping
        scheduler = (
            ParetoHalving(
                epochs=ss.finetune_epochs,
                grace=es.grace_epochs,
                eta=es.reduction_factor,
                baseline_size_bytes=baseline["size_bytes"],
            )
            if es.enabled
            else None
        )
        # Save the experiment state (trials, Optuna's study) every second rather than
        # Tune's adaptive >= 10 s, so a resumed search loses at most a second of it.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
        if restore:
            tuner = tune.Tuner.restore(
                str(tune_dir), trainable, resume_unfinished=True, resume_errored=False
            )
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
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
        known = {t.trial_id for t in store.trials(job_id)}
        orphans = tracking.delete_orphan_runs(c, experiment_id, parent_id, known)
        if orphans:
            log.info("deleted %d MLflow runs of trials lost with the dead driver", len(orphans))
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
    points = [
        FrontPoint(t.trial_id, _quality(spec.task, t.accuracy, t.loss), t.size_bytes or 0)
        for t in done
    ]
    best = choose(
        points,
        baseline_accuracy=baseline["quality"],
        baseline_size_bytes=baseline["size_bytes"],
        rule=spec.export.choose,
        max_accuracy_drop=spec.constraints.max_accuracy_drop,
        max_size_bytes=spec.constraints.max_size_bytes,
    )
    final = st.CANCELLED if cancelled else st.SUCCEEDED
    failed = [t for t in store.trials(job_id) if t.status == st.TRIAL_FAILED]
    if done:  # the views' last state, with the point being exported marked
        views = live.snapshot(
            store.get(job_id),
            store.trials(job_id),
            baseline_accuracy=baseline["accuracy"],
            baseline_size_bytes=baseline["size_bytes"],
            chosen_trial_id=best.trial_id if best else None,
            final=True,
        )
        live.publish(c, parent_id, views)
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
    if spec.resources.gpus:  # measured again where the trial measured it: on a GPU
        again = ray.get(
            ray.remote(reevaluate)
            .options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
            .remote(str(out), spec.model_dump(mode="json"))
        )
    else:  # a CPU job: here, without starting a Ray worker for a second's work
        again = reevaluate(str(out), spec.model_dump(mode="json"))
    again_quality = _quality(spec.task, again["accuracy"], again["loss"])
    if again["size_bytes"] != best.size_bytes or abs(again_quality - best.accuracy) > 1e-9:
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
            "best_info_bound_bytes": again["info_bound_bytes"],
            "best_bytes_over_bound": again["info_ratio"],
        },
    )
    if "onnx" in spec.export.formats:
        onnx_out = ray.get(
            ray.remote(export_onnx)
            .options(num_cpus=spec.resources.cpus)
            .remote(str(out), str(job_dir / BEST_ONNX_FILE), spec.model_dump(mode="json"))
        )
        tracking.log_metrics(c, parent_id, {f"onnx_{k}": v for k, v in onnx_out.items()})
        c.log_artifact(parent_id, str(job_dir / BEST_ONNX_FILE))
    tracking.set_tags(c, parent_id, {"sparq.best_trial_id": best.trial_id})
    c.log_artifact(parent_id, str(out), "model")
    c.log_dict(parent_id, trial.policy or {}, "model/policy.json")
    version = tracking.register_model(
        c,
        parent_id,
        "model",
        name=f"sparq-{spec.name}",
        tags={
            "sparq.job_id": job_id,
            "sparq.trial_id": best.trial_id,
            "accuracy": again["accuracy"],
            "size_bytes": again["size_bytes"],
        },
        description=f"sparq job {job_id}: trial {best.trial_id} ({spec.export.choose} rule)",
    )
    tracking.set_tags(c, parent_id, {"sparq.model_version": version.version})
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
    parser.add_argument(
        "--resume", action="store_true", help="continue a running job whose driver died"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    store = st.JobStore(settings.db_url)
    job_id = args.job_id
    if args.resume:
        claimed = store.transition(job_id, {st.RUNNING}, driver_pid=os.getpid())
    else:
        claimed = store.transition(
            job_id, {st.QUEUED}, status=st.RUNNING, started_at=st.utcnow(), driver_pid=os.getpid()
        )
    if not claimed:
        want = "running" if args.resume else "queued"
        status = store.get(job_id).status
        log.error("job %s is not %s (status %s); nothing to do", job_id, want, status)
        return 2
    try:
        run_search(store, settings, job_id, resume=args.resume)
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
