"""Live views of a running job on its MLflow parent run: the front (PNG and an
interactive HTML page), hypervolume against trials and the chosen point's policy,
under the ``pareto/`` artifact folder, so the MLflow UI shows the current front
without any other tool.

Rendering takes a second of CPU or more (matplotlib, plotly.js embedded in the HTML
page), so it happens in a renderer process at the lowest CPU priority (nice 19),
driven by one background thread that uploads what it drew: the Tune loop only hands
over the newest snapshot and returns, and the views draw with CPU the trials leave
idle rather than slowing them down (on a machine whose cores are all busy training,
they lag). A process, not a thread, so that a starved renderer never holds the
driver's GIL; in a session of its own, so that the kernel's per-session scheduling
groups do not undo its priority. Snapshots arriving while a render is running or within
``min_interval_s`` of the last upload replace each other (only the newest is drawn),
and the final one is always drawn. A failed render or upload is logged, never
raised: the views must not fail the search.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

from dashboards import (
    PlotPoint,
    export_choice,
    front_plot,
    hypervolume_plot,
    quality,
    render_views,
)
from service.spec import JobSpec
from service.tasks import get_task
from workers.search import jobstore as st
from workers.search import tracking

log = logging.getLogger("sparq.live")
ARTIFACT_DIR = "pareto"
VIEWS_DIR = "views"  # jobs/JOB/views: the newest drawings, uploaded through the outbox
MIN_INTERVAL_S = 10.0


class Snapshot(NamedTuple):
    """What one render of the views needs; plain values only."""

    finished: list[PlotPoint | None]  # finishing order; None: a failed or stopped trial
    baseline_accuracy: float  # on the front's quality axis, as the points' accuracy
    baseline_size_bytes: int
    chosen_trial_id: str | None
    title: str
    quality_label: str = "accuracy"  # the task's quality axis (service/tasks.py)


def snapshot(
    job: st.Job,
    trials: Sequence[st.Trial],
    *,
    baseline_accuracy: float,
    baseline_size_bytes: int,
    baseline_loss: float | None = None,
    chosen_trial_id: str | None = None,
    final: bool = False,
) -> Snapshot:
    """The views' input from the job store, on the task's quality axis (exp(-loss) for
    a language model, not its token accuracy). While the search runs, the chosen point
    is the one the export rule would pick now (the job's task, rule and constraints)."""
    # failed and early-stopped trials count as steps; only completed ones are points
    ended = [
        t
        for t in trials
        if t.status in (st.TrialStatus.COMPLETED, st.TrialStatus.FAILED, st.TrialStatus.STOPPED)
    ]
    ended.sort(key=lambda t: (t.finished_at is None, t.finished_at, t.number))
    spec = JobSpec.model_validate(job.spec)
    task = get_task(spec.task)
    finished: list[PlotPoint | None] = [
        PlotPoint(t.trial_id, quality(task, t), t.size_bytes or 0, t.policy or {})
        if t.status == st.TrialStatus.COMPLETED
        else None
        for t in ended
    ]
    baseline = {"accuracy": baseline_accuracy, "loss": baseline_loss}
    completed = [t for t in ended if t.status == st.TrialStatus.COMPLETED]
    if chosen_trial_id is None and completed and not final:
        best = export_choice(
            task,
            completed,
            baseline=baseline,
            baseline_size_bytes=baseline_size_bytes,
            rule=spec.export.choose,
            max_accuracy_drop=spec.constraints.max_accuracy_drop,
            max_size_bytes=spec.constraints.max_size_bytes,
        )
        chosen_trial_id = best.trial_id if best else None
    state = "final" if final else f"{len(ended)}/{spec.search.trials} trials"
    return Snapshot(
        finished=finished,
        baseline_accuracy=quality(task, baseline),
        baseline_size_bytes=baseline_size_bytes,
        chosen_trial_id=chosen_trial_id,
        title=f"job {job.id} ({spec.name}), {state}, rule {spec.export.choose}",
        quality_label=task.quality_label,
    )


def render(snap: Snapshot, out_dir: str) -> list[str]:
    """Every view of ``snap`` into ``out_dir`` (front, hypervolume, chosen policy)."""
    done = [p for p in snap.finished if p is not None]
    fp = front_plot(
        done,
        baseline_accuracy=snap.baseline_accuracy,
        baseline_size_bytes=snap.baseline_size_bytes,
        chosen_trial_id=snap.chosen_trial_id,
        title=snap.title,
        quality_label=snap.quality_label,
    )
    hv = hypervolume_plot(
        snap.finished, baseline_size_bytes=snap.baseline_size_bytes, title="hypervolume vs trials"
    )
    return [str(p) for p in render_views(fp, hv, out_dir)]


def publish(rec: tracking.Recorder, views_dir: Path, snap: Snapshot, renderer: Executor) -> float:
    """Have ``renderer`` draw every view of ``snap`` into ``views_dir`` and record their
    upload to the parent run; returns seconds. Each file is replaced atomically, so
    an upload of the folder (maybe later, after an MLflow outage) reads whole files:
    the newest views."""
    started = time.perf_counter()
    if not any(p is not None for p in snap.finished):
        return 0.0
    views_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".render-", dir=views_dir.parent) as tmp:
        for path in renderer.submit(render, snap, tmp).result():
            os.replace(path, views_dir / Path(path).name)
    rec.artifacts(tracking.PARENT, views_dir, ARTIFACT_DIR)
    return time.perf_counter() - started


def _lowest_priority() -> None:
    """The renderer's initializer: the lowest CPU priority. Where the kernel groups
    processes by session for scheduling (autogroups, common on Linux), nice orders only
    the processes of one session, and a session's group gets as much CPU as all of
    Ray's workers together; so the renderer starts a session of its own and sets that
    group's nice too."""
    os.nice(19)
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):  # Linux: end with the driver, even
        import ctypes  # when it is killed with SIGKILL (its own session outlives it)

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    with contextlib.suppress(OSError):  # no autogroups here: nice alone is enough
        Path("/proc/self/autogroup").write_text("19")


def priority() -> tuple[int, str | None]:
    """This process's nice and its autogroup's line (None without autogroups)."""
    try:
        group: str | None = Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        group = None
    return os.nice(0), group


def renderer_process() -> ProcessPoolExecutor:
    """One fresh process (spawned: the driver has Ray's threads) at nice 19."""
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_lowest_priority,
    )


class LiveViews:
    """Publishes the newest snapshot on a background thread, at most once per
    ``min_interval_s`` (the last one always)."""

    def __init__(
        self, rec: tracking.Recorder, views_dir: Path, *, min_interval_s: float = MIN_INTERVAL_S
    ) -> None:
        self.rec, self.views_dir, self.min_interval_s = rec, Path(views_dir), min_interval_s
        self._cond = threading.Condition()
        self._pending: Snapshot | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._joined = False
        self.submitted = 0  # snapshots handed over
        self.published = 0  # renders uploaded
        self.busy_s = 0.0  # seconds from handing a snapshot to the renderer to uploaded

    def submit(self, snap: Snapshot) -> None:
        """Hand over a snapshot; never blocks on rendering."""
        with self._cond:
            if self._closed:
                raise RuntimeError("LiveViews.submit after close()")
            self._pending = snap
            self.submitted += 1
            if self._thread is None:
                self._start()
            self._cond.notify()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sparq-live-views", daemon=True)
        self._thread.start()

    def end(self, final: Snapshot | None = None) -> None:
        """Take no more snapshots: draw ``final`` if given, else the last pending one,
        without waiting for it (:meth:`close` waits). Idempotent."""
        with self._cond:
            if final is not None and not self._closed:
                self._pending = final
                self.submitted += 1
                if self._thread is None:
                    self._start()
            self._closed = True
            self._cond.notify()

    def close(self, timeout: float = 120.0) -> None:
        """:meth:`end`, then wait for the last views to be uploaded and stop the renderer."""
        self.end()
        if self._thread is None or self._joined:
            return
        self._thread.join(timeout)
        self._joined = True
        log.info(
            "live views: %d snapshots, %d published, %.1f s rendering (at nice 19) and "
            "uploading off the Tune loop",
            self.submitted,
            self.published,
            self.busy_s,
        )

    def _run(self) -> None:
        with renderer_process() as renderer:
            self._loop(renderer)

    def _loop(self, renderer: Executor) -> None:
        last = -float("inf")
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:  # closed, nothing left to draw
                    return
                wait = last + self.min_interval_s - time.monotonic()
                if wait > 0 and not self._closed:
                    self._cond.wait(wait)  # newer snapshots may replace this one meanwhile
                    continue
                snap, self._pending = self._pending, None
            try:
                self.busy_s += publish(self.rec, self.views_dir, snap, renderer)
                self.published += 1
            except Exception:  # the views must never fail the search
                log.exception("could not draw the live views into %s", self.views_dir)
            last = time.monotonic()
