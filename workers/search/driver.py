"""The per-job search driver: ``python -m workers.search.driver JOB_ID``.

One process per job, started by the service's launcher. It joins (or starts) Ray,
hands the float baseline to a Ray task first, then, while the baseline trains,
imports Tune and MLflow, describes the model, builds the search space and starts
``Tuner`` + ``OptunaSearch`` over both objectives: the first trials start their
workers at once and wait for the baseline in Ray's object store. It keeps the job
store and MLflow current as trials finish, then exports, reloads and re-evaluates
the chosen point. It is the only writer of a job's progress, trials and outcome; it
never imports FastAPI.

Start-up is on the path of every job (``bench/overhead.py`` measures it), so this
module imports only the store, the spec and Ray's core before the baseline is
submitted; everything heavier is imported inside :func:`run_search` after.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.secrets import known_secrets, scrub
from service.settings import Settings, get_settings
from service.spec import JobSpec
from service.weights import Roots
from workers.envguard import harden
from workers.errors import last_line
from workers.jobs.baseline import (
    Baseline,
    ModelDescription,
    Reevaluation,
    describe_model,
    export_onnx,
    knob_space,
    load_saved_baseline,
    reevaluate,
    save_baseline,
    train_baseline,
)
from workers.search import jobstore as st
from workers.search.jobstore import WARNING_PREFIX, process_start, record_mlflow_id

if TYPE_CHECKING:  # imported at run time only once the baseline is on its way
    from dashboards import FrontPoint
    from search_spaces import KnobSpace
    from workers.search.progress import JobProgress

__all__ = [
    "Export",
    "SearchOutcome",
    "SetUp",
    "export",
    "main",
    "record_outcome",
    "reevaluate",
    "run_search",
    "search",
    "set_up",
    "train_baseline",
]

log = logging.getLogger("sparq.driver")
BEST_FILE = "best.sparq"
OPTUNA_JOURNAL = "optuna.journal"  # optuna-dashboard opens it (see the README)
BEST_ONNX_FILE = "best.onnx"
OUTBOX_DIR = "outbox"  # as workers.jobs.trial.OUTBOX_DIR (not imported: it imports torch)
SYSTEM_RETRIES = 3  # runs of a trial whose worker or node died, before it counts failed
RUNGS_FILE = "rungs.json"  # early stopping's rungs, kept for a resumed search
RAY_PRELOAD = "torch,workers.jobs.trial"  # what every baseline and trial worker imports


def _init_ray(settings: Settings, spec: JobSpec) -> None:
    import ray

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **kwargs)
    else:
        # address='local': a new local Ray even when `ray start` left a cluster on this host
        ray.init(address="local", num_cpus=settings.ray_num_cpus or os.cpu_count() or 1, **kwargs)
    check_fits(spec.resources.cpus, spec.resources.gpus, _node_resources(ray.nodes()))


def ray_lost(address: str | None, timeout: float = 3.0) -> bool:
    """Whether the Ray cluster this driver joined no longer answers at its address."""
    if not address or ":" not in address:
        return False
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        return True
    return False


def _node_resources(nodes: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [dict(n.get("Resources", {})) for n in nodes if n.get("Alive")]


def check_fits(cpus: float, gpus: float, nodes: list[dict[str, float]]) -> None:
    """A trial (and the baseline) runs on one node: refuse at once a request that no
    single node of the cluster can ever hold, rather than wait for it forever."""
    for key, field, need in (("CPU", "resources.cpus", cpus), ("GPU", "resources.gpus", gpus)):
        if need <= 0:
            continue
        have = [n.get(key, 0.0) for n in nodes]
        largest = max(have, default=0.0)
        if largest <= 0:
            raise ValueError(
                f"{field}={need:g} but the Ray cluster ({len(nodes)} nodes) has no {key}s"
            )
        if need > largest:
            raise ValueError(
                f"{field}={need:g} fits no node of the Ray cluster: a trial runs on one node, "
                f"and the largest has {largest:g} {key}s ({len(nodes)} nodes, "
                f"{sum(have):g} {key}s in all)"
            )


@dataclass(frozen=True)
class Remaining:
    """What a (resumed) search has left to do. The job store is the record of the
    search: it holds a trial once the trial has ended (completed, stopped or failed),
    so those are kept and never run again; trials that were running when a driver
    died are run again as new trials. Tune's saved experiment is never restored: it
    is saved every few seconds and non-atomically, so it can lag the store (a trial
    that finished just before a kill) or be cut short (a kill while writing)."""

    trials: int  # trials still to run
    taken: frozenset[int]  # the numbers the kept trials hold
    time_budget_s: float | None  # what is left of search.time_budget_s

    @classmethod
    def of(cls, job: st.Job, trials: list[st.Trial], spec: JobSpec) -> Remaining:
        budget = spec.search.time_budget_s
        if budget is not None and job.started_at is not None:
            started = job.started_at.replace(tzinfo=job.started_at.tzinfo or UTC)
            budget = max(0.0, budget - (st.utcnow() - started).total_seconds())
        left = max(0, spec.search.trials - len(trials))
        return cls(0 if budget == 0 else left, frozenset(t.number for t in trials), budget)

    def __str__(self) -> str:
        budget = "" if self.time_budget_s is None else f", {self.time_budget_s:.0f} s of budget"
        return f"{len(self.taken)} trials kept, {self.trials} to run{budget}"


def _tune_name(job_dir: Path) -> str:
    """A new Tune experiment per driver of the job: ``tune``, ``tune-2``, ..."""
    name, k = "tune", 1
    while (job_dir / name).exists():
        k += 1
        name = f"tune-{k}"
    return name


def _fail_unfinished(storage: Any, study_name: str) -> None:
    """Trials of the job's Optuna study that a dead driver left running are told
    failed, so the sampler neither waits on nor learns from them. (Finished ones stay:
    Tune tells the searcher a trial's end before the job store records it.)"""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # the driver died before the study was created
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        study.tell(t.number, state=TrialState.FAIL)


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


class BaselineWatch:
    """Waits for the float baseline off the Tune loop. When it is trained: keeps it
    (``on_ready``: disk, job store, MLflow) and frees the resources reserved for it.
    When it fails: records why (``on_error``), which stops the search, and
    :meth:`result` raises, which fails the job with the baseline's error rather than
    with each trial's."""

    def __init__(
        self,
        ref: Any,
        *,
        reserved: Any = None,
        on_ready: Callable[[Baseline], None],
        on_error: Callable[[str], Any],
    ) -> None:
        self.ref, self.reserved = ref, reserved
        self.on_ready, self.on_error = on_ready, on_error
        self._result: Baseline | None = None
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="sparq-baseline", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import ray

        try:
            result: Baseline = ray.get(self.ref)
            self.on_ready(result)
            self._result = result
        except BaseException as e:
            self._error = f"training the float baseline failed: {last_line(str(e), repr(e))}"
            log.error("%s", self._error)
            try:
                self.on_error(self._error)
            except Exception:  # pragma: no cover - the error is still raised by result()
                log.exception("could not record the baseline's failure")
        finally:
            if self.reserved is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.reserved)  # its CPUs go to the trials

    def result(self) -> Baseline:
        self._thread.join()
        if self._result is None:
            raise RuntimeError(self._error or "the float baseline is missing")
        return self._result


def _submit_baseline(spec: JobSpec, spec_json: dict[str, Any], roots: Roots) -> tuple[Any, Any]:
    """The baseline task, in a placement group of its own: the search starts while it
    trains and its first trials wait for it holding their CPUs, so the baseline's
    resources are reserved first (never taken by a waiting trial: no deadlock)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": spec.resources.cpus}
    if spec.resources.gpus:
        bundle["GPU"] = spec.resources.gpus
    pg = placement_group([bundle])
    ref = (
        ray.remote(train_baseline)
        .options(
            num_cpus=spec.resources.cpus,
            num_gpus=spec.resources.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg),
        )
        .remote(spec_json, roots)
    )
    return ref, pg


def _process_env() -> None:
    """The driver's environment, set before any thread starts (writes later would race
    readers on other threads; see workers/envguard.py)."""
    harden()
    # No CSV/JSON/TensorBoard result files per trial: JobProgress records every
    # result in the job store and MLflow, and nothing reads Tune's copies.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # A failed trial reports {"failed": True, "error": ...} without the metrics.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # The outbox's sender retries with its own backoff: one MLflow request must fail
    # fast rather than retry for minutes inside the client.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # A local Ray (no stack) prestarts a worker per CPU as this driver connects: with
    # torch and the engine imported as they start, the baseline and the first trials
    # find them warm. (The stack's head sets the same: service/stack.py.)
    os.environ.setdefault("RAY_preload_python_modules", RAY_PRELOAD)


def mlflow_names(owner: str | None, name: str) -> tuple[str, str]:
    """The job's MLflow experiment and registered model. Jobs of one owner with one
    ``name`` share both (the grouping a name asks for: one experiment, versions of one
    model); two owners never do, so no one moves another's ``best`` alias. ``~``
    occurs in no principal and no job name (nor ``/``), so no owner/name pair spells
    another's. Without an owner (no tokens, one user): the names sparq always used."""
    if owner is None:
        return f"sparq/{name}", f"sparq-{name}"
    return f"sparq/{owner}/{name}", f"sparq-{owner}~{name}"


# Passes of the job's MLflow sender at least this far apart while the job runs: on a
# 24-trial job of 4 s trials (bench/overhead.py), 0.5 s passes made 681 requests, 395
# of them one epoch's metrics each, and the MLflow server's CPU took ~17 s from the
# trials; the UI lags the job by at most this much more.
SEND_GAP_S = 2.0


class Tracking:
    """The job's MLflow side: the driver's outbox stream and the one sender of the
    job's outbox (which tells the job store the MLflow ids as they exist)."""

    def __init__(self, store: st.JobStore, settings: Settings, job_id: str, job_dir: Path) -> None:
        from workers.search import outbox, tracking

        self.root = job_dir / OUTBOX_DIR
        self.rec = tracking.Recorder(self.root, outbox.DRIVER_STREAM)
        self.store, self.job_id = store, job_id
        self._held = contextlib.ExitStack()  # the outbox's sender lock, until close()
        if not self._held.enter_context(outbox.sender_lock(self.root)):
            # an earlier driver of this job still sending (being stopped): it lets go
            # when it exits; until then the records wait in the outbox
            log.warning("another process holds the outbox of job %s; records wait", job_id)
            self.sender: tracking.MlflowSender | None = None
            return
        self.sender = tracking.MlflowSender(
            self.root,
            settings.mlflow_tracking_uri,
            on_id=self._on_id,
            on_pending=self._on_pending,
            min_gap_s=SEND_GAP_S,
        )
        self.sender.watch(self.rec)
        self.sender.start()

    def _on_id(self, key: str, value: str) -> None:
        record_mlflow_id(self.store, self.job_id, key, value)

    def _on_pending(self, left: int) -> None:
        self.store.update(self.job_id, mlflow_pending=left)

    def close(self, drain_s: float) -> int:
        """Send what is left for at most ``drain_s`` seconds; returns the bytes unsent
        (they wait in the outbox for the service, which sends them when MLflow is back)."""
        from workers.search import outbox

        if self.sender is None:
            return outbox.pending(self.root)
        left = self.sender.drain(drain_s)
        self.sender.close()
        # Every id once more: a trial's row written after the sender told the store of
        # its run (the row did not exist then) learns it here.
        try:
            for key, value in outbox.State.load(self.root).ids.items():
                self._on_id(key, value)
        except Exception:  # the ids are in the outbox's state; this only copies them
            log.exception("could not copy the MLflow ids of job %s to the job store", self.job_id)
        self._held.close()
        self.store.update(self.job_id, mlflow_pending=left, mlflow_synced=left == 0)
        return left


@dataclass(frozen=True)
class BaselineSource:
    """Where the search's float baseline comes from: a Ray task training it now
    (``reserved``: the placement group held for it) or, for a resumed job, the one an
    earlier driver kept (``saved``). Trials read it through ``ref`` either way."""

    ref: Any  # ObjectRef of a workers.jobs.baseline.Baseline (maybe still training)
    reserved: Any = None
    saved: Baseline | None = None


def _start_baseline(
    spec: JobSpec, spec_json: dict[str, Any], job_dir: Path, roots: Roots, *, resume: bool
) -> BaselineSource:
    import ray

    saved = load_saved_baseline(job_dir) if resume else None
    if saved is not None:
        return BaselineSource(ray.put(saved), saved=saved)  # a resumed driver starts from it
    log.info("training the float baseline")
    ref, reserved = _submit_baseline(spec, spec_json, roots)
    return BaselineSource(ref, reserved=reserved)


@dataclass(frozen=True)
class SetUp:
    """What the search is of, fixed before it starts: the job's row as the driver
    claimed it (read once: nothing the set-up needs changes while the driver runs),
    its spec, its directory, the baseline on its way, what a resumed job has left,
    and the space built from the untrained model."""

    job: st.Job
    spec: JobSpec
    spec_json: dict[str, Any]  # the spec as trials and Ray tasks take it
    job_dir: Path
    baseline: BaselineSource
    left: Remaining
    model: ModelDescription
    space: KnobSpace
    resume: bool

    @property
    def job_id(self) -> str:
        return self.job.id


def set_up(
    job: st.Job,
    job_dir: Path,
    baseline: BaselineSource,
    kept: list[st.Trial],
    rec: Any,
    *,
    resume: bool,
) -> SetUp:
    """Describe the untrained model and build the job's space (while the baseline
    trains), and work out what is left to run from the trials the store kept. Records
    the spec (once: a resumed job's run has it), the pruning report and the space on
    the job's MLflow run."""
    from workers.search import tracking

    spec = JobSpec.model_validate(job.spec)
    spec_json = spec.model_dump(mode="json")
    left = Remaining.of(job, kept, spec)
    if resume:
        log.info("resuming job %s: %s", job.id, left)
    if baseline.saved is None:
        rec.params(tracking.PARENT, tracking.flatten(spec_json))
    model = describe_model(spec)  # the untrained model: layers, groups, float size
    rec.log_dict(tracking.PARENT, model.pruning_report, "pruning_report.json")
    rec.log_dict(tracking.PARENT, model.adjusted, "layers_adjusted.json")
    space = knob_space(spec, model)
    rec.log_dict(tracking.PARENT, space.model_dump(mode="json"), "search_space.json")
    return SetUp(job, spec, spec_json, job_dir, baseline, left, model, space, resume)


@dataclass(frozen=True)
class SearchOutcome:
    """What the search left: the trained baseline, every trial the job store holds
    for the job once Tune is done, and whether a cancel ended it."""

    baseline: Baseline
    trials: list[st.Trial]
    cancelled: bool

    @property
    def completed(self) -> list[st.Trial]:
        return [t for t in self.trials if t.status == st.TrialStatus.COMPLETED]

    @property
    def failed(self) -> list[st.Trial]:
        return [t for t in self.trials if t.status == st.TrialStatus.FAILED]

    @property
    def status(self) -> st.JobStatus:
        """The job's final status, once the export (if any) reproduced its point."""
        return st.JobStatus.CANCELLED if self.cancelled else st.JobStatus.SUCCEEDED

    @property
    def failure(self) -> str | None:
        """Why the job fails although the search ran: every trial failed (not a cancel
        that came before any trial ended)."""
        if self.completed or not self.failed or self.cancelled:
            return None
        return f"all {len(self.failed)} trials failed; the first: {self.failed[0].error}"


def search(
    setup: SetUp, store: st.JobStore, settings: Settings, rec: Any, progress: JobProgress
) -> SearchOutcome:
    """Run the trials the job has left (``setup.left``) with Tune, Optuna and the
    job's scheduler; returns once Tune is done: every trial ran, the time budget is
    spent, or the job was cancelled or its baseline failed (``JobStopper``). Writes the
    job store only through the baseline's keeper and ``progress`` (the trials)."""
    from workers.search import outbox, tracking
    from workers.search.trials import TrialContext

    job_id, parent, model = setup.job_id, tracking.PARENT, setup.model

    def keep(baseline: Baseline) -> None:
        if baseline.size_bytes != model.size_bytes:
            raise RuntimeError(
                f"the trained float checkpoint has {baseline.size_bytes} bytes, the "
                f"untrained one {model.size_bytes}: the model's structure changed"
            )
        if setup.baseline.saved is not None:
            return
        save_baseline(setup.job_dir, baseline)  # a resumed driver starts from it, not again
        store.update(
            job_id,
            baseline_accuracy=baseline.accuracy,
            baseline_loss=baseline.loss,
            baseline_size_bytes=baseline.size_bytes,
        )
        rec.metrics(
            parent,
            {
                "baseline_accuracy": baseline.accuracy,
                "baseline_loss": baseline.loss,
                "baseline_size_bytes": baseline.size_bytes,
                **(
                    {"baseline_start_quality": baseline.start_quality}
                    if baseline.start_quality is not None
                    else {}
                ),
            },
        )
        for text in baseline.warnings:  # a collapsed baseline is said, not compressed silently
            add_warning(store, job_id, text)
        if baseline.warnings:
            rec.tags(parent, {"sparq.baseline_warning": " | ".join(baseline.warnings)[:5000]})

    reserved = setup.baseline.reserved
    if reserved is not None:  # before the watch, which removes the group when done
        _wait_reserved(reserved, store, job_id)
    watch = BaselineWatch(
        setup.baseline.ref,
        reserved=reserved,
        on_ready=keep,
        on_error=lambda why: store.update(job_id, error=why),  # JobStopper sees it
    )
    ctx = TrialContext(
        job_id=job_id,
        spec=setup.spec_json,
        space=setup.space.model_dump(mode="json"),
        baseline=setup.baseline.ref,
        job_dir=str(setup.job_dir),
    )
    tuner = _tuner(setup, settings, ctx, _searcher(setup, rec), progress)
    if setup.left.trials:
        tuner.fit()
    baseline = watch.result()  # a failed baseline fails the job, with its own error
    cancelled = store.get(job_id).cancel_requested
    trials = store.trials(job_id)
    known = {t.trial_id for t in trials}
    for stream in outbox.streams(setup.job_dir / OUTBOX_DIR):  # runs the resumed search lost
        trial_id = stream.removeprefix("trial-")
        if stream.startswith("trial-") and trial_id not in known:
            rec.delete(tracking.trial_key(trial_id))
    return SearchOutcome(baseline, trials, cancelled)


def _searcher(setup: SetUp, rec: Any) -> Any:
    """The job's Optuna study (its journal: a resumed search goes on learning from it)
    behind Tune's searcher, with the job's constraints and sampler."""
    from search_spaces import to_optuna
    from service.spec import OBJECTIVE_MODES
    from workers.search import tracking
    from workers.search.sampling import ConstrainedOptunaSearch, make_sampler, resolve_sampler

    spec, study_name = setup.spec, f"sparq-{setup.job_id}"
    storage = _optuna_storage(setup.job_dir / OPTUNA_JOURNAL)
    if setup.resume:
        _fail_unfinished(storage, study_name)
    dists = to_optuna(setup.space)
    sampler = resolve_sampler(spec, len(dists))
    log.info("sampler %s (search.sampler=%s, %d knobs)", sampler, spec.search.sampler, len(dists))
    rec.params(tracking.PARENT, {"sampler.resolved": sampler})
    searcher = ConstrainedOptunaSearch(
        space=dists,
        metric=list(spec.objectives),
        mode=[OBJECTIVE_MODES[o] for o in spec.objectives],
        sampler=make_sampler(spec, len(dists)),
        spec=spec,
        study_name=study_name,
        storage=storage,
    )
    _label_study(storage, study_name, spec, setup.job_id)
    return searcher


def _tuner(setup: SetUp, settings: Settings, ctx: Any, searcher: Any, progress: JobProgress) -> Any:
    """A fresh Tune experiment (never a restored one) of the trials left, numbered into
    the numbers the kept trials do not hold."""
    from ray import tune

    from workers.search.progress import JobStopper
    from workers.search.scheduler import ParetoHalving
    from workers.search.trials import TrialNames, run_trial

    spec, job_dir = setup.spec, setup.job_dir
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, ctx=ctx),
        {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus},
    )
    es = spec.search.early_stopping
    scheduler = (
        ParetoHalving(
            epochs=spec.search_space.finetune_epochs,
            grace=es.grace_epochs,
            eta=es.reduction_factor,
            baseline_size_bytes=setup.model.size_bytes,
            state_path=job_dir / RUNGS_FILE,  # a resumed search keeps its rungs
        )
        if es.enabled
        else None
    )
    names = TrialNames(setup.left.taken)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=setup.left.trials,
            max_concurrent_trials=spec.search.concurrency,
            time_budget_s=setup.left.time_budget_s,
            reuse_actors=True,
            trial_name_creator=names,
            trial_dirname_creator=lambda t: f"{names(t)}_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=_tune_name(job_dir),  # one per driver: never restored
            storage_path=str(job_dir),
            stop=JobStopper(settings.db_url, setup.job_id),
            callbacks=[progress],
            # a worker or node that died: the trial runs again elsewhere
            failure_config=tune.FailureConfig(max_failures=SYSTEM_RETRIES),
            verbose=0,
        ),
    )


@dataclass(frozen=True)
class Export:
    """The exported point: the chosen trial, as it was chosen (its front quality and
    size), its checkpoint copied to ``best.sparq`` and that file measured again."""

    trial: st.Trial
    point: FrontPoint
    checkpoint: Path
    measured: Reevaluation
    onnx: dict[str, float] | None  # the ONNX export's parity, when export.formats asks


def _choose(spec: JobSpec, outcome: SearchOutcome) -> FrontPoint | None:
    from dashboards import export_choice

    return export_choice(
        spec.task,
        outcome.completed,
        baseline={"accuracy": outcome.baseline.accuracy, "loss": outcome.baseline.loss},
        baseline_size_bytes=outcome.baseline.size_bytes,
        rule=spec.export.choose,
        max_accuracy_drop=spec.constraints.max_accuracy_drop,
        max_size_bytes=spec.constraints.max_size_bytes,
    )


def _measure(path: Path, spec: JobSpec) -> Reevaluation:
    """Measure the exported file again where the trial measured it: on a GPU in a Ray
    task for a GPU job; here for a CPU job, without starting a worker for a second's work."""
    spec_json = spec.model_dump(mode="json")
    if not spec.resources.gpus:
        return reevaluate(str(path), spec_json)
    import ray

    again: Reevaluation = ray.get(
        ray.remote(reevaluate)
        .options(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)
        .remote(str(path), spec_json)
    )
    return again


def export(
    setup: SetUp,
    outcome: SearchOutcome,
    measure: Callable[[Path, JobSpec], Reevaluation] = _measure,
) -> Export | None:
    """Choose the point (the job's rule over the front of the trials meeting the
    constraints; None if none does), copy its checkpoint to ``best.sparq`` and measure
    that file again: it must reproduce the trial's quality and size exactly, or the job
    fails. Then the ONNX export, if asked. Writes no job store row and no MLflow record
    (:func:`record_outcome` does, once this has succeeded)."""
    spec = setup.spec
    best = _choose(spec, outcome)
    if best is None:
        return None
    trial = next(t for t in outcome.completed if t.trial_id == best.trial_id)
    if not trial.checkpoint or not Path(trial.checkpoint).exists():
        raise RuntimeError(f"trial {best.trial_id} has no checkpoint on disk at {trial.checkpoint}")
    out = setup.job_dir / BEST_FILE
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(trial.checkpoint, tmp)
    tmp.replace(out)
    again = measure(out, spec)
    from dashboards import quality

    again_quality = quality(spec.task, {"accuracy": again.accuracy, "loss": again.loss})
    if again.size_bytes != best.size_bytes or abs(again_quality - best.accuracy) > 1e-9:
        raise RuntimeError(
            f"exported checkpoint does not reproduce trial {best.trial_id}: reported "
            f"(accuracy={best.accuracy}, size_bytes={best.size_bytes}), "
            f"reloaded {again.as_dict()}"
        )
    onnx_out = None
    if "onnx" in spec.export.formats:
        import ray

        onnx_out = ray.get(
            ray.remote(export_onnx)
            .options(num_cpus=spec.resources.cpus)
            .remote(str(out), str(setup.job_dir / BEST_ONNX_FILE), setup.spec_json)
        )
    return Export(trial, best, out, again, onnx_out)


def record_outcome(
    store: st.JobStore,
    setup: SetUp,
    outcome: SearchOutcome,
    exported: Export | None,
    rec: Any,
    progress: JobProgress,
) -> None:
    """The job's outcome in the job store (its one write after the search), then the
    final views and MLflow's copy of the model, which follow through the outbox and
    never change the outcome."""
    spec, job_id = setup.spec, setup.job_id
    if exported is None:
        msg = (
            f"no completed trial met the constraints {spec.constraints.model_dump()}"
            if outcome.completed
            else "no trial completed"
        )
        store.update(job_id, status=outcome.status, message=msg, finished_at=st.utcnow())
        _final_views(progress, setup, outcome, None)
        return
    again = exported.measured
    store.update(
        job_id,
        status=outcome.status,
        best_trial_id=exported.trial.trial_id,
        best_accuracy=again.accuracy,
        best_size_bytes=again.size_bytes,
        best_checkpoint=str(exported.checkpoint),
        finished_at=st.utcnow(),
        message=(
            "search cancelled; exported the best of the finished trials"
            if outcome.cancelled
            else None
        ),
    )
    _final_views(progress, setup, outcome, exported.trial.trial_id)
    _record_model(rec, setup, outcome.baseline, exported)


def _final_views(
    progress: JobProgress, setup: SetUp, outcome: SearchOutcome, chosen: str | None
) -> None:
    """The views' last state, with the exported point marked."""
    from workers.search import live

    if outcome.completed:
        progress.views.end(
            live.snapshot(
                setup.job,
                outcome.trials,
                baseline_accuracy=outcome.baseline.accuracy,
                baseline_loss=outcome.baseline.loss,
                baseline_size_bytes=outcome.baseline.size_bytes,
                chosen_trial_id=chosen,
                final=True,
            )
        )


def _record_model(rec: Any, setup: SetUp, baseline: Baseline, exported: Export) -> None:
    """MLflow's copy of the export: metrics, the model and its registration."""
    from workers.search import tracking

    parent, again, job_id = tracking.PARENT, exported.measured, setup.job_id
    trial_id, job_dir = exported.trial.trial_id, setup.job_dir
    rec.metrics(
        parent,
        {
            "best_accuracy": again.accuracy,
            "best_size_bytes": again.size_bytes,
            "best_compression": baseline.size_bytes / again.size_bytes,
            "best_info_bound_bytes": again.info_bound_bytes,
            "best_bytes_over_bound": again.info_ratio,
        },
    )
    if exported.onnx is not None:
        rec.metrics(parent, {f"onnx_{k}": v for k, v in exported.onnx.items()})
        rec.artifact(parent, job_dir / BEST_ONNX_FILE)
    rec.tags(parent, {"sparq.best_trial_id": trial_id})
    rec.artifact(parent, exported.checkpoint, "model")
    rec.log_dict(parent, exported.trial.policy or {}, "model/policy.json")
    rec.register(
        parent,
        "model",
        name=mlflow_names(setup.job.owner, setup.spec.name)[1],
        tags={
            "sparq.job_id": job_id,
            "sparq.trial_id": trial_id,
            "accuracy": again.accuracy,
            "size_bytes": again.size_bytes,
        },
        description=f"sparq job {job_id}: trial {trial_id} ({setup.spec.export.choose} rule)",
    )


def run_search(
    store: st.JobStore, settings: Settings, job_id: str, *, resume: bool = False
) -> None:
    """A claimed job, as its data flows: the baseline handed to Ray first, then
    :func:`set_up`, :func:`search`, :func:`export`, :func:`record_outcome`. The job's
    row is read once, here; the store is written as the baseline is kept and as each
    trial ends (during the search), and once with the outcome. Any failure marks the
    MLflow run FAILED and is raised (:func:`main` records it, or leaves the job to be
    resumed); MLflow's records are settled in every case."""
    job = store.get(job_id)  # as claimed: the set-up needs nothing newer
    spec = JobSpec.model_validate(job.spec)
    job_dir = settings.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)

    # The baseline goes to Ray first; all that follows overlaps with its training.
    _init_ray(settings, spec)
    roots = Roots.of(settings)
    baseline = _start_baseline(spec, spec.model_dump(mode="json"), job_dir, roots, resume=resume)

    # Tune, Optuna, torch (the trial module) and MLflow load now, while it trains (the
    # functions below import what they use again: already loaded, free).
    from workers.search import (
        tracking,
        trials,  # noqa: F401
    )
    from workers.search.progress import JobProgress

    tr = Tracking(store, settings, job_id, job_dir)
    rec, parent = tr.rec, tracking.PARENT
    # Said again by a resumed driver: the sender creates each once (by key).
    rec.experiment(mlflow_names(job.owner, spec.name)[0])
    rec.run(parent, f"job-{job_id}", {"sparq.job_id": job_id})
    rec.status(parent, "RUNNING")
    progress: JobProgress | None = None
    try:
        setup = set_up(job, job_dir, baseline, store.trials(job_id), rec, resume=resume)
        m = setup.model  # what the engine does otherwise than asked, said on the job
        store.update(job_id, layers_left_dense=m.left_dense, layers_adjusted=m.adjusted)
        progress = JobProgress(
            db_url=settings.db_url,
            job_id=job_id,
            space=setup.space,
            baseline_size_bytes=setup.model.size_bytes,
            job_dir=str(job_dir),
            task=spec.task,
        )
        outcome = search(setup, store, settings, rec, progress)
        if outcome.failure:
            raise RuntimeError(outcome.failure)
        exported = export(setup, outcome)
        record_outcome(store, setup, outcome, exported, rec, progress)
        rec.status(parent, "KILLED" if outcome.cancelled else "FINISHED")
    except BaseException as e:
        rec.tags(parent, {"sparq.error": scrub(f"{type(e).__name__}: {e}", store.secrets)[:5000]})
        rec.status(parent, "FAILED")
        raise
    finally:
        if progress is not None:
            progress.close_views()  # stops the renderer process; a no-op once closed
        _settle_tracking(store, job_id, tr, settings.mlflow_drain_s)


def _settle_tracking(store: st.JobStore, job_id: str, tr: Tracking, drain_s: float) -> None:
    """Send what MLflow has not taken yet, for a bounded time. What is left waits in
    the outbox (the service sends it when MLflow is back) and the job says so; it
    never changes the job's outcome."""
    try:
        left = tr.close(drain_s)
    except Exception as e:  # the outcome is recorded already: tracking must not undo it
        log.exception("could not settle the job's MLflow records")
        left, why = -1, f"{type(e).__name__}: {e}"
    else:
        held = "another process held the outbox"
        why = (tr.sender.last_error if tr.sender is not None else held) or "MLflow was slow"
    if left:
        add_warning(
            store,
            job_id,
            f"{WARNING_PREFIX} of this job yet ({why}); they wait in "
            f"{tr.root} and the service sends them, in order, when MLflow is back",
        )
    from workers.search import outbox

    dropped = outbox.State.load(tr.root).dropped
    if dropped:
        add_warning(
            store,
            job_id,
            f"MLflow refused {len(dropped)} record(s) of this job, which its copy in MLflow "
            f"lacks: {'; '.join(dropped[:3])}",
        )


def add_warning(store: st.JobStore, job_id: str, text: str) -> None:
    """A warning on the job: something to know that did not change its outcome."""
    try:
        job = store.get(job_id)
        store.update(job_id, warnings=[*(job.warnings or []), text])
    except Exception:  # pragma: no cover - a warning must never fail the job
        log.exception("could not record a warning on job %s: %s", job_id, text)


def _wait_reserved(pg: Any, store: st.JobStore, job_id: str) -> None:
    """Start the search only once the baseline's resources are reserved (at once on a
    free cluster); a cancel meanwhile is honoured by the search's stopper."""
    waited = 0
    while not pg.wait(timeout_seconds=5):
        waited += 5
        log.info("waiting %d s for resources to train the baseline", waited)
        if store.get(job_id).cancel_requested:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.search.driver")
    parser.add_argument("job_id")
    parser.add_argument(
        "--resume", action="store_true", help="continue a running job whose driver died"
    )
    args = parser.parse_args(argv)
    _process_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings().prepare()  # umask 077, as the service's (if it started us)
    store = st.JobStore(settings.db_url, known_secrets(settings))
    job_id = args.job_id
    me = {  # who runs the job: the launcher adopts or resumes it by these
        "driver_pid": os.getpid(),
        "driver_started": process_start(os.getpid()),
        "driver_ray_address": settings.ray_address,
    }
    if args.resume:
        claimed = store.transition(job_id, {st.JobStatus.RUNNING}, **me)
    else:
        claimed = store.transition(
            job_id, {st.JobStatus.QUEUED}, status=st.JobStatus.RUNNING, started_at=st.utcnow(), **me
        )
    if not claimed:
        want = st.JobStatus.RUNNING if args.resume else st.JobStatus.QUEUED
        status = store.get(job_id).status
        log.error("job %s is not %s (status %s); nothing to do", job_id, want, status)
        return 2
    try:
        run_search(store, settings, job_id, resume=args.resume)
    except (SystemExit, KeyboardInterrupt) as e:
        # A signal (Ray's SIGTERM handler raises SystemExit): the launcher stopping us
        # for a cancel, or the service shutting down. Not the job's failure: the
        # launcher records the cancel or resumes the job from its saved state.
        log.warning("job %s: driver interrupted (%r); its state is kept", job_id, e)
        return 143
    except Exception as e:  # recorded, never swallowed: the job says why it failed
        traceback.print_exc()
        if ray_lost(settings.ray_address):
            # the cluster went away under the search (the stack was killed): the job
            # is not at fault; the launcher resumes it from its saved state
            log.warning("job %s: the Ray cluster at %s is gone", job_id, settings.ray_address)
            return 75
        store.transition(  # never over an outcome already recorded
            job_id,
            {st.JobStatus.RUNNING},
            status=st.JobStatus.FAILED,
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
