"""How a running search keeps its job current: the Tune callback that records each
finished trial (job store, front, MLflow tags and tables, live views) and the stopper
that ends the search on cancel. Both run in the driver process; the driver imports
this module only after it has handed the baseline to Ray, because Tune and MLflow
take seconds to import.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from ray import tune

from dashboards import (
    FrontPoint,
    front_points,
    hypervolume_reference,
    job_front,
    minimized,
    non_dominated_ranks,
    quality,
)
from search_spaces import KnobSpace, policy_from_params
from service.secrets import known_secrets
from service.settings import get_settings
from service.tasks import get_task
from workers.errors import last_line
from workers.jobs.trial import OUTBOX_DIR
from workers.search import jobstore as st
from workers.search import live, outbox, tracking
from workers.search.trials import trial_number

log = logging.getLogger("sparq.progress")


class _Lazy:
    """Ray pickles the run config (stopper, callbacks) with the experiment state, so
    these hold only plain values and open their store and recorder lazily."""

    _unpicklable: tuple[str, ...] = ("_store", "_recorder")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._unpicklable}

    @property
    def store(self) -> st.JobStore:
        if getattr(self, "_store", None) is None:
            # the secrets not pickled with the run config: this process's own
            self._store = st.JobStore(self.db_url, known_secrets(get_settings()))
        return self._store

    db_url: str


class JobStopper(_Lazy, tune.Stopper):
    """Ends the whole search once a cancel is requested or the job has an error (the
    float baseline failed to train), checked twice a second."""

    def __init__(self, db_url: str, job_id: str) -> None:
        self.db_url, self.job_id = db_url, job_id
        self.last, self.seen = 0.0, False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("baseline_failed"):  # a trial found the baseline failed: stop now,
            self.seen = True  # not when the driver's watch has written it (trials that
        return self.stop_all()  # fail at once could all run through before that)

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self.seen and now - self.last > 0.5:
            self.last = now
            job = self.store.get(self.job_id)
            self.seen = job.cancel_requested or job.error is not None
        return self.seen


class JobProgress(_Lazy, tune.Callback):
    """Records each finished trial and keeps the front, the job store and MLflow
    current. Runs in the driver process. What MLflow should show goes to the job's
    outbox (the driver's stream), so the Tune loop never waits on MLflow, and MLflow
    being down fails nothing."""

    def __init__(
        self,
        *,
        db_url: str,
        job_id: str,
        space: KnobSpace,
        baseline_size_bytes: int,
        job_dir: str,
        task: str = "classification",
    ) -> None:
        self.task = task
        self.db_url, self.job_id, self.space = db_url, job_id, space
        self.baseline_size_bytes = baseline_size_bytes
        self.baseline_accuracy: float | None = None  # told by the trials' results
        self.baseline_loss: float | None = None  # so is its loss (the LM quality axis)
        self.job_dir = job_dir
        self.tagged: dict[str, tuple[bool, int]] = {}  # trial id -> (on front, rank) as tagged

    _unpicklable = (*_Lazy._unpicklable, "_live")
    baseline_loss: float | None = None  # a callback pickled before it was kept: unknown

    @property
    def recorder(self) -> tracking.Recorder:
        if getattr(self, "_recorder", None) is None:
            self._recorder = tracking.Recorder(self.outbox_root, outbox.DRIVER_STREAM)
        return self._recorder

    @property
    def outbox_root(self) -> Path:
        return Path(self.job_dir) / OUTBOX_DIR

    @property
    def views(self) -> live.LiveViews:
        """Plots on the parent run, rendered off the Tune loop (workers/search/live.py)."""
        if getattr(self, "_live", None) is None:
            self._live = live.LiveViews(self.recorder, Path(self.job_dir) / live.VIEWS_DIR)
        return self._live

    def close_views(self) -> None:
        """Wait for the last views and stop the renderer; a no-op if none was started."""
        if getattr(self, "_live", None) is not None:
            self._live.close()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("failed"):  # the trial's own work failed: it reported why
            self.failed(trial.trial_id, str(trial), trial.config, str(result["error"]))
            return
        if "accuracy" not in result:  # ended without reporting: count it as failed
            self.failed(
                trial.trial_id,
                str(trial),
                trial.config,
                "trial ended without reporting a result",
            )
            return
        if result.get("final") is False:  # stopped early by the scheduler at a rung
            self.stopped(trial.trial_id, str(trial), trial.config, result)
            return
        self.completed(trial.trial_id, str(trial), trial.config, result)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.failed(trial.trial_id, str(trial), trial.config, _trial_error(trial))

    def completed(
        self,
        trial_id: str,
        name: str,
        config: dict[str, Any],
        result: dict[str, Any],
    ) -> None:
        policy = policy_from_params(self.space, config)
        self._learn_baseline(result)
        self.store.upsert_trial(
            self.job_id,
            trial_id,
            number=trial_number(name),
            status=st.TrialStatus.COMPLETED,
            policy=policy.model_dump(mode="json"),
            accuracy=float(result["accuracy"]),
            loss=float(result["loss"]),
            size_bytes=int(result["size_bytes"]),
            bops=result.get("bops"),
            relative_bops=result.get("relative_bops"),
            duration_s=float(result.get("duration_s", 0.0)),
            checkpoint=result.get("checkpoint_path"),
            node_id=result.get("node_id"),
            finished_at=st.utcnow(),
            **self._run_id(trial_id),
        )
        self._refresh()

    def _run_id(self, trial_id: str) -> dict[str, str]:
        """``mlflow_run_id`` for the trial's row if the sender has created its run, else
        nothing: the sender, on its own thread, may have told the store the id between
        this read and the write (a ``None`` here must not undo that), and tells it
        again when it closes (:meth:`workers.search.driver.Tracking.close`)."""
        try:
            run_id = outbox.State.load(self.outbox_root).ids.get(tracking.trial_key(trial_id))
        except (OSError, ValueError):
            return {}
        return {"mlflow_run_id": run_id} if run_id else {}

    def stopped(
        self, trial_id: str, name: str, config: dict[str, Any], result: dict[str, Any]
    ) -> None:
        """A trial early stopping ended: kept with what it measured at its last rung,
        but never a point of the front nor a candidate for export."""
        self._learn_baseline(result)
        self.store.upsert_trial(
            self.job_id,
            trial_id,
            number=trial_number(name),
            status=st.TrialStatus.STOPPED,
            policy=policy_from_params(self.space, config).model_dump(mode="json"),
            accuracy=float(result["accuracy"]),
            loss=float(result["loss"]),
            size_bytes=int(result["size_bytes"]),
            duration_s=float(result.get("duration_s", 0.0)),
            error=f"stopped early after fine-tune epoch {result['epoch']} (not fully trained)",
            node_id=result.get("node_id"),
            finished_at=st.utcnow(),
            **self._run_id(trial_id),
        )
        run = tracking.trial_key(trial_id)
        self.recorder.tags(run, {"sparq.stopped_early": result["epoch"]})
        self.recorder.status(run, "KILLED")
        self._refresh()

    def _learn_baseline(self, result: dict[str, Any]) -> None:
        """The float baseline's accuracy, which every trial reports: the search starts
        while the baseline trains, so the driver learns it from the first result."""
        if result.get("baseline_accuracy") is not None:
            self.baseline_accuracy = float(result["baseline_accuracy"])
            if result.get("baseline_loss") is not None:
                self.baseline_loss = float(result["baseline_loss"])

    def failed(self, trial_id: str, name: str, config: dict[str, Any], error: str) -> None:
        try:
            policy = policy_from_params(self.space, config).model_dump(mode="json")
        except (KeyError, ValueError):  # the config itself may be what failed
            policy = None
        self.store.upsert_trial(
            self.job_id,
            trial_id,
            number=trial_number(name),
            status=st.TrialStatus.FAILED,
            policy=policy,
            error=error,
            finished_at=st.utcnow(),
        )
        self._refresh()

    def _refresh(self) -> None:
        trials = self.store.trials(self.job_id)
        done = [t for t in trials if t.status == st.TrialStatus.COMPLETED]
        front = job_front(self.task, done, self.baseline_size_bytes)
        self.store.update(
            self.job_id,
            trials_completed=len(done),
            trials_failed=sum(t.status == st.TrialStatus.FAILED for t in trials),
            trials_stopped=sum(t.status == st.TrialStatus.STOPPED for t in trials),
            front_size=len(front.points),
            hypervolume=front.hypervolume,
        )
        baseline = {
            "accuracy": self.baseline_accuracy,
            "loss": self.baseline_loss,
            "size_bytes": self.baseline_size_bytes,
        }
        if self.baseline_accuracy is not None:
            baseline["quality"] = quality(self.task, baseline)
        self._log_front(done, front.points, front.hypervolume, len(trials), baseline)
        if done and self.baseline_accuracy is not None:
            self.views.submit(
                live.snapshot(
                    self.store.get(self.job_id),
                    trials,
                    baseline_accuracy=self.baseline_accuracy,
                    baseline_loss=self.baseline_loss,
                    baseline_size_bytes=self.baseline_size_bytes,
                )
            )

    def _log_front(
        self,
        done: list[st.Trial],
        front: list[FrontPoint],
        hv: float,
        n: int,
        baseline: dict[str, Any],
    ) -> None:
        rec, parent = self.recorder, tracking.PARENT
        rec.metrics(parent, {"hypervolume": hv, "front_size": len(front)}, step=n)
        by_id = {t.trial_id: t for t in done}
        # "accuracy" is the trial's own (per-token for a language model); "quality" is
        # the axis the front ranks by, named by "quality_label"
        rows = [
            {
                "trial_id": p.trial_id,
                "accuracy": by_id[p.trial_id].accuracy,
                "quality": p.accuracy,
                "size_bytes": p.size_bytes,
                "compression": self.baseline_size_bytes / p.size_bytes,
            }
            for p in front
        ]
        table = [{**row, **_policy_columns(by_id[str(row["trial_id"])].policy)} for row in rows]
        rec.table(parent, table, "pareto/front_table.json")
        rec.log_dict(
            parent,
            {
                "baseline": baseline,
                "trials_finished": n,
                "hypervolume": hv,
                "hypervolume_reference": hypervolume_reference(self.task),
                "quality_label": get_task(self.task).quality_label,
                "front": rows,
            },
            "pareto/front.json",
        )
        ranks = non_dominated_ranks(
            [
                minimized(p.accuracy, p.size_bytes, self.baseline_size_bytes)
                for p in front_points(self.task, done)
            ]
        )
        members = {p.trial_id for p in front}
        for t, rank in zip(done, ranks, strict=True):
            state = (t.trial_id in members, rank)
            if self.tagged.get(t.trial_id) != state:
                tags = {"pareto": str(state[0]).lower(), "rank": rank}
                rec.tags(tracking.trial_key(t.trial_id), tags)  # only what changed
                self.tagged[t.trial_id] = state


def _policy_columns(policy: dict[str, Any] | None) -> dict[str, Any]:
    """A policy as flat table columns: one bits and one sparsity column per layer."""
    if not policy:
        return {}
    cols: dict[str, Any] = {"noise_rate": policy.get("noise_rate")}
    for name, lp in policy.get("layers", {}).items():
        cols[f"{name}.bits"] = lp["bits"]
        cols[f"{name}.sparsity"] = round(lp["sparsity"], 4)
    return cols


def _trial_error(trial: Any) -> str:
    """The last line of the trial's exception (the full traceback is in its log)."""
    text = ""
    try:
        if trial.error_file and os.path.exists(trial.error_file):
            text = Path(trial.error_file).read_text()
    except OSError:
        pass
    return last_line(text, "trial failed without an error message")[:2000]
