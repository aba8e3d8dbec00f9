"""How a running search keeps its job current: the Tune callback that records each
finished trial (job store, front, MLflow tags and tables, live views) and the stopper
that ends the search on cancel. Both run in the driver process; the driver imports
this module only after it has handed the baseline to Ray, because Tune and MLflow
take seconds to import.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import tune

from dashboards import FrontPoint, non_dominated_ranks, sparq_front
from search_spaces import KnobSpace, policy_from_params
from service import store as st
from service.spec import front_quality
from workers import live, tracking
from workers.errors import last_line
from workers.trial import CHECKPOINT_FILE, trial_name, trial_number


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


class JobStopper(_Lazy, tune.Stopper):
    """Ends the whole search once a cancel is requested or the job has an error (the
    float baseline failed to train), checked twice a second."""

    def __init__(self, db_url: str, job_id: str) -> None:
        self.db_url, self.job_id = db_url, job_id
        self.last, self.seen = 0.0, False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.stop_all()

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self.seen and now - self.last > 0.5:
            self.last = now
            job = self.store.get(self.job_id)
            self.seen = job.cancel_requested or job.error is not None
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
        tracking_uri: str,
        parent_run_id: str,
        task: str = "classification",
    ) -> None:
        self.task = task
        self.db_url, self.job_id, self.space = db_url, job_id, space
        self.baseline_size_bytes = baseline_size_bytes
        self.baseline_accuracy: float | None = None  # told by the trials' results
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.tagged: dict[str, tuple[bool, int]] = {}  # run id -> (on front, rank) as tagged

    _unpicklable = (*_Lazy._unpicklable, "_live", "_writer", "_pending")

    def _write(self, fn: Callable[..., None], *args: Any) -> None:
        """Run an MLflow write on the job's writer thread: in order, off the Tune loop,
        which only updates the job store (SQLite, milliseconds) and goes on to start
        the next trial. :meth:`on_experiment_end` waits for every write and raises the
        first that failed, so nothing is lost or failed silently."""
        if getattr(self, "_writer", None) is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparq-mlflow")
            self._pending: list[Future[None]] = []
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        self._pending.append(self._writer.submit(fn, *args))

    def drain(self) -> None:
        """Wait for the MLflow writes handed to the writer thread; raise the first error."""
        if getattr(self, "_writer", None) is None:
            return
        self._writer.shutdown(wait=True)
        del self._writer
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    @property
    def views(self) -> live.LiveViews:
        """Plots on the parent run, rendered off the Tune loop (workers/live.py)."""
        if getattr(self, "_live", None) is None:
            self._live = live.LiveViews(self.tracking_uri, self.parent_run_id)
        return self._live

    def close_views(self) -> None:
        """Wait for the last views and stop the renderer; a no-op if none was started."""
        if getattr(self, "_live", None) is not None:
            self._live.close()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # The views stay open: the driver draws the final ones, with the exported point.
        self.drain()

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
        self._learn_baseline(result)
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
            node_id=result.get("node_id"),
            finished_at=st.utcnow(),
        )
        self._refresh()

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
            status=st.TRIAL_STOPPED,
            policy=policy_from_params(self.space, config).model_dump(mode="json"),
            accuracy=float(result["accuracy"]),
            loss=float(result["loss"]),
            size_bytes=int(result["size_bytes"]),
            duration_s=float(result.get("duration_s", 0.0)),
            error=f"stopped early after fine-tune epoch {result['epoch']} (not fully trained)",
            mlflow_run_id=result.get("mlflow_run_id"),
            node_id=result.get("node_id"),
            finished_at=st.utcnow(),
        )
        if result.get("mlflow_run_id"):
            self._write(self._mark_stopped, str(result["mlflow_run_id"]), result["epoch"])
        self._refresh()

    def _mark_stopped(self, run_id: str, epoch: int) -> None:
        tracking.set_tags(self.client, run_id, {"sparq.stopped_early": epoch})
        self.client.set_terminated(run_id, "KILLED")

    def _learn_baseline(self, result: dict[str, Any]) -> None:
        """The float baseline's accuracy, which every trial reports: the search starts
        while the baseline trains, so the driver learns it from the first result."""
        if result.get("baseline_accuracy") is not None:
            self.baseline_accuracy = float(result["baseline_accuracy"])

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
            FrontPoint(t.trial_id, front_quality(self.task, t.accuracy, t.loss), t.size_bytes or 0)
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
        baseline = {"accuracy": self.baseline_accuracy, "size_bytes": self.baseline_size_bytes}
        self._write(self._log_front, done, front.points, front.hypervolume, len(trials), baseline)
        if done and self.baseline_accuracy is not None:
            self.views.submit(
                live.snapshot(
                    self.store.get(self.job_id),
                    trials,
                    baseline_accuracy=self.baseline_accuracy,
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
            [(t.size_bytes or 0, -front_quality(self.task, t.accuracy, t.loss)) for t in done]
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
    return last_line(text, "trial failed without an error message")[:2000]
