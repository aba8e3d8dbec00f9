"""Service overhead: the same search run through the whole service and in a bare loop.

The same trial (fixed, realistic work: apply a policy to the float baseline,
fine-tune, encode, evaluate the decoded checkpoint) is run ``--trials`` times

* through the whole service path: REST ``POST /v1/jobs`` → launcher → search
  driver subprocess → Ray (baseline task, Tune + OptunaSearch trials) → MLflow
  server, timed from the POST until ``GET /v1/jobs/{id}`` says the job is terminal;
* through a bare, in-process loop: the same float baseline (``train_baseline``
  called as a plain function), then ``optuna`` with the service's sampler and
  ``study.optimize(objective, n_trials=N, n_jobs=concurrency)`` whose objective
  does the trial's work minus Ray and MLflow.

Both use the same spec (model, baseline epochs, fine-tune epochs, seed, one CPU per
trial, the same concurrency). The number of fine-tune epochs is calibrated first so
that one trial, run alone with one thread, takes about ``--trial-seconds``. The
bare loop runs first, then the service (``--repeats R`` alternates them R times and
reports medians). Stack start-up (MLflow server, API) is not counted in either.

It prints a table, the ratio ``overhead_ratio`` = service wall time / bare wall time
(target: <= 1.25), a breakdown of where the service's time goes, and ends with one
JSON line of its figures. N defaults to the job spec's default trial budget (24):
the service's cost is mostly fixed per job (driver start, Ray join, Tune start-up,
export), so the ratio is stated for the search a user gets by default, and the
extra seconds are printed too (``overhead_s`` = service - bare) so that the ratio at any
other N can be read off.

Usage (from the repository root)::

    .venv/bin/python bench/overhead.py                 # 24 trials x ~5 s, concurrency 2
    .venv/bin/python bench/overhead.py --quick         # 4 trials x ~2 s
    .venv/bin/python bench/overhead.py --trials 16 --concurrency 2 --trial-seconds 5
    .venv/bin/python bench/overhead.py --record        # also rewrite its section of
                                                       # docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402

from bench import _doc  # noqa: E402
from search_spaces import KnobSpace, policy_from_params, to_optuna  # noqa: E402
from service import stack  # noqa: E402
from service.spec import OBJECTIVE_MODES, JobSpec, SearchSpec  # noqa: E402
from workers.compress.train import pick_device, set_threads  # noqa: E402
from workers.jobs.baseline import (  # noqa: E402
    ModelDescription,
    describe_model,
    knob_space,
    train_baseline,
)
from workers.jobs.trial import compress  # noqa: E402
from workers.search.sampling import make_sampler  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}
TARGET_RATIO = 1.25
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Service overhead (bench/overhead.py)"


# -- the spec and the trial's work ---------------------------------------------
def make_spec(args: argparse.Namespace, finetune_epochs: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "bench-overhead",
            "model": {"builtin": args.model},
            "dataset": {"builtin": "digits"},
            "baseline": {"epochs": args.baseline_epochs},
            "search_space": {"finetune_epochs": finetune_epochs},
            # No accuracy constraint: every run exports a point, so the service
            # always does its full finish (export, reload, re-evaluate).
            "constraints": {"max_accuracy_drop": None},
            "search": {
                "trials": args.trials,
                "concurrency": args.concurrency,
                "seed": args.seed,
                "sampler": "tpe",
            },
            "resources": {"cpus": 1, "gpus": 0},
        }
    )


def trial_work(
    spec: JobSpec,
    space: KnobSpace,
    state: dict[str, Any],
    params: dict[str, Any],
    number: int,
    *,
    epochs: int | None = None,
) -> tuple[float, int]:
    """What ``workers.jobs.trial.run_trial`` does, minus Ray and MLflow: the same
    ``workers.jobs.trial.compress``, seeded the same way; returns (accuracy, size_bytes)."""
    if epochs is not None:
        ss = spec.search_space.model_copy(update={"finetune_epochs": epochs})
        spec = spec.model_copy(update={"search_space": ss})
    set_threads(spec.resources.cpus)
    torch.manual_seed(spec.search.seed * 100_003 + number)
    data, metrics = compress(
        spec,
        policy_from_params(space, params),
        state,
        pick_device(spec.resources.gpus),
        seed=number,
        meta={"job_id": "bare", "trial_id": str(number)},
    )
    return float(metrics["accuracy"]), len(data)


def middle_params(space: KnobSpace) -> dict[str, Any]:
    """A representative policy for calibration: the middle of every knob (bits,
    sparsity, noise rate), whatever the knobs are named."""
    from optuna.distributions import CategoricalDistribution

    params: dict[str, Any] = {}
    for name, dist in to_optuna(space).items():
        if isinstance(dist, CategoricalDistribution):
            params[name] = dist.choices[len(dist.choices) // 2]
        else:
            params[name] = (dist.low + dist.high) / 2  # type: ignore[attr-defined]
    return params


@dataclass
class Calibration:
    finetune_epochs: int
    epoch_s: float
    fixed_s: float
    trial_work_s: float  # one whole trial, alone, one thread, with finetune_epochs


def calibrate(args: argparse.Namespace) -> Calibration:
    """Pick fine-tune epochs so one trial takes about ``--trial-seconds`` alone."""
    spec = make_spec(args, finetune_epochs=1)
    base = train_baseline(spec.model_dump(mode="json"))  # also warms imports and caches
    space = knob_space(spec, describe_model(spec))
    params = middle_params(space)
    trial_work(spec, space, base.state, params, 1, epochs=1)  # warm-up
    t0 = time.perf_counter()
    trial_work(spec, space, base.state, params, 1, epochs=0)
    fixed = time.perf_counter() - t0
    probe = 3
    t0 = time.perf_counter()
    trial_work(spec, space, base.state, params, 1, epochs=probe)
    epoch_s = max(1e-3, (time.perf_counter() - t0 - fixed) / probe)
    epochs = max(1, round((args.trial_seconds - fixed) / epoch_s))
    spec = make_spec(args, finetune_epochs=epochs)
    t0 = time.perf_counter()
    trial_work(spec, space, base.state, params, 1)
    return Calibration(epochs, epoch_s, fixed, time.perf_counter() - t0)


# -- bare path -------------------------------------------------------------------
@dataclass
class BareRun:
    wall_s: float
    baseline_s: float
    study_s: float
    trial_s: list[float] = field(default_factory=list)


def suggest(trial: optuna.Trial, dists: dict[str, Any]) -> dict[str, Any]:
    """Sample every knob from the distributions the service hands to OptunaSearch."""
    out: dict[str, Any] = {}
    for name, d in dists.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = trial.suggest_categorical(name, d.choices)
        elif isinstance(d, optuna.distributions.FloatDistribution):
            out[name] = trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)
        else:  # the space only uses these two; a new kind must be added here
            raise TypeError(f"unexpected distribution {d!r} for {name}")
    return out


_WORKER: dict[str, Any] = {}


def _init_worker(spec_json: dict[str, Any], model: ModelDescription, state: Any) -> None:
    torch.set_num_threads(1)
    spec = JobSpec.model_validate(spec_json)
    _WORKER.update(spec=spec, space=knob_space(spec, model), state=state)


def _work_in_worker(params: dict[str, Any], number: int) -> tuple[float, int]:
    return trial_work(_WORKER["spec"], _WORKER["space"], _WORKER["state"], params, number)


def run_bare(spec: JobSpec, *, processes: bool = False) -> BareRun:
    """The bare loop. ``processes=False`` (the headline): the trials run in Optuna's
    ``n_jobs`` threads, in this process. ``processes=True``: each of those threads
    hands its trial's work to a pool of ``concurrency`` worker processes (started
    inside the timed region), so the trials do not share one GIL, as Ray's do."""
    spec_json = spec.model_dump(mode="json")
    t0 = time.perf_counter()
    base = train_baseline(spec_json)
    model = describe_model(spec)  # as the driver does (there, while the baseline trains)
    baseline_s = time.perf_counter() - t0
    space = knob_space(spec, model)
    dists = to_optuna(space)
    durations: list[float] = []
    lock = threading.Lock()
    pool = None
    if processes:
        pool = ProcessPoolExecutor(
            max_workers=spec.search.concurrency,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(spec_json, model, base.state),
        )

    def objective(trial: optuna.Trial) -> tuple[float, int]:
        started = time.perf_counter()
        params = suggest(trial, dists)
        # Ray names trials trial-001, trial-002, ...: the same seeds here.
        if pool is None:
            out = trial_work(spec, space, base.state, params, trial.number + 1)
        else:
            out = pool.submit(_work_in_worker, params, trial.number + 1).result()
        with lock:
            durations.append(time.perf_counter() - started)
        return out

    study = optuna.create_study(
        directions=[
            "maximize" if OBJECTIVE_MODES[o] == "max" else "minimize" for o in spec.objectives
        ],
        sampler=make_sampler(spec, len(dists)),
    )
    t1 = time.perf_counter()
    try:
        study.optimize(objective, n_trials=spec.search.trials, n_jobs=spec.search.concurrency)
    finally:
        if pool is not None:
            pool.shutdown()
    end = time.perf_counter()
    failed = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    if failed:
        raise RuntimeError(f"{len(failed)} bare trials did not complete: {failed[0]}")
    return BareRun(end - t0, baseline_s, end - t1, durations)


# -- service path ------------------------------------------------------------------
@dataclass
class ServiceRun:
    wall_s: float
    job: dict[str, Any]
    phases: dict[str, float]
    trial_s: list[float]  # duration_s reported by each trial (inside the Ray worker)
    trial_run_s: list[float]  # each trial's MLflow run, start to end


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) sparq\.driver (.*)$")


def _driver_log_time(path: Path, message: str) -> float | None:
    """Epoch seconds of the first driver log line starting with ``message``."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = _LOG_TIME.match(line)
        if m and m.group(2).startswith(message):
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    dt = datetime.fromisoformat(value)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def service_phases(
    t_post: float, t_seen: float, job: dict[str, Any], home: Path, mlflow_url: str
) -> tuple[dict[str, float], list[float]]:
    """Where the service's wall time goes, from the job store, the driver log and MLflow.

    Marks (epoch seconds): POST → driver running (``started_at``) → Ray up (driver log
    line "training the float baseline") → baseline logged (MLflow metric) → first
    trial's MLflow run starts → last trial's run ends → job ``finished_at`` → the
    poll sees it.
    """
    from workers.search import tracking

    c = tracking.client(mlflow_url)
    marks: dict[str, float | None] = {"post": t_post, "started": _ts(job.get("started_at"))}
    marks["ray_up"] = _driver_log_time(
        home / "jobs" / job["id"] / "driver.log", "training the float baseline"
    )
    run_id = job["mlflow"]["run_id"]
    hist = c.get_metric_history(run_id, "baseline_accuracy") if run_id else []
    marks["baseline_done"] = hist[0].timestamp / 1000 if hist else None
    runs = c.search_runs(
        [job["mlflow"]["experiment_id"]],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{run_id}'",
        max_results=10_000,
    )
    starts = [r.info.start_time / 1000 for r in runs]
    ends = [r.info.end_time / 1000 for r in runs if r.info.end_time]
    marks["first_trial"] = min(starts) if starts else None
    marks["last_trial"] = max(ends) if ends else None
    marks["finished"] = _ts(job.get("finished_at"))
    marks["seen"] = t_seen
    names = {
        "started": "submit -> driver running (launcher, interpreter, imports)",
        "ray_up": "driver set-up: MLflow parent run, ray.init",
        "baseline_done": "float baseline (Ray task)",
        "first_trial": "Tune start-up to first trial running",
        "last_trial": "trials (first start to last end)",
        "finished": "finish: export, reload, re-evaluate, MLflow",
        "seen": "status poll latency",
    }
    phases: dict[str, float] = {}
    prev = t_post
    for key, label in names.items():
        t = marks[key]
        if t is None:
            continue
        phases[label] = t - prev
        prev = t
    run_s = [(r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time]
    return phases, run_s


def run_service(spec: JobSpec, url: str, home: Path, mlflow_url: str) -> ServiceRun:
    from service.client import Client

    client = Client(url)
    t_post = time.time()
    t0 = time.perf_counter()
    job = client.submit(spec.model_dump(mode="json"))
    while job["status"] not in TERMINAL:
        time.sleep(0.2)
        job = client.job(job["id"])
    wall = time.perf_counter() - t0
    t_seen = time.time()
    if job["status"] != "succeeded" or job["trials_completed"] != spec.search.trials:
        log = home / "jobs" / job["id"] / "driver.log"
        raise RuntimeError(
            f"service job ended {job['status']} with {job['trials_completed']}/"
            f"{spec.search.trials} trials: {job.get('error') or job.get('message')}; see {log}"
        )
    trials = client.trials(job["id"])
    phases, run_s = service_phases(t_post, t_seen, job, home, mlflow_url)
    return ServiceRun(wall, job, phases, [t["duration_s"] or 0.0 for t in trials], run_s)


class Stack:
    """MLflow server, Ray head and REST API (with its launcher) under a temporary
    SPARQ_HOME: what `sparq up` runs."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.mlflow: stack.Mlflow | None = None
        self.ray: stack.RayHead | None = None
        self._serve: Any = None
        self.url = self.mlflow_url = ""
        self.start_s = 0.0

    def __enter__(self) -> Stack:
        from service.api import create_app
        from service.settings import get_settings

        t0 = time.perf_counter()
        host = "127.0.0.1"
        self.mlflow = stack.start_mlflow(self.home, host, stack.free_port(host))
        self.mlflow_url = self.mlflow.url
        os.environ["SPARQ_HOME"] = str(self.home)
        os.environ["SPARQ_MLFLOW_TRACKING_URI"] = self.mlflow.url
        os.environ.pop("SPARQ_DATABASE_URL", None)
        try:
            # As `sparq up` does: one Ray head for the stack, joined by each driver.
            self.ray = stack.start_ray(self.home)
            os.environ["SPARQ_RAY_ADDRESS"] = self.ray.address
            get_settings.cache_clear()
            self._serve = stack.serve_in_thread(
                create_app(get_settings()), host, stack.free_port(host)
            )
            self.url = self._serve.__enter__()
        except BaseException:
            if self.ray is not None:
                self.ray.stop()
            self.mlflow.stop()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._serve is not None:
                self._serve.__exit__(None, None, None)
        finally:
            if self.ray is not None:
                self.ray.stop()
            if self.mlflow is not None:
                self.mlflow.stop()


# -- report ------------------------------------------------------------------------
def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def machine() -> str:
    return f"{_doc.machine()}, optuna {optuna.__version__}"


def _load() -> float:
    return os.getloadavg()[0]


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # (idle + iowait, total)


def wait_quiet(busy_max: float = 0.15, timeout_s: float = 120.0) -> float:
    """Wait (up to ``timeout_s``) until the machine's CPUs have been at most ``busy_max``
    busy for three seconds running, so that no run inherits the previous one's
    stragglers (Ray shutting down, MLflow's job consumers starting) or someone else's
    load. Returns the busy fraction of the last second (0 where /proc/stat is absent)."""
    deadline = time.monotonic() + timeout_s
    quiet, busy = 0, 0.0
    prev = _cpu_times()
    while prev is not None and time.monotonic() < deadline and quiet < 3:
        time.sleep(1.0)
        cur = _cpu_times()
        if cur is None:
            break
        idle, total = cur[0] - prev[0], cur[1] - prev[1]
        busy = 1.0 - idle / total if total else 0.0
        quiet = quiet + 1 if busy <= busy_max else 0
        prev = cur
    return busy


@dataclass
class Runs:
    bare: list[BareRun] = field(default_factory=list)
    procs: list[BareRun] = field(default_factory=list)
    svc: list[ServiceRun] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-min load average before each run
    busy: list[float] = field(default_factory=list)  # CPU busy fraction before each run


def render(
    args: argparse.Namespace, cal: Calibration, runs: Runs, stack_start_s: float
) -> tuple[str, dict[str, Any]]:
    n, c = args.trials, args.concurrency
    b_wall = statistics.median(r.wall_s for r in runs.bare)
    s_wall = statistics.median(r.wall_s for r in runs.svc)
    ratio = s_wall / b_wall
    p_wall = statistics.median(r.wall_s for r in runs.procs) if runs.procs else None
    ideal = runs.bare[0].baseline_s + math.ceil(n / c) * cal.trial_work_s
    order = "bare (threads), bare (processes), service" if runs.procs else "bare, service"
    lines = [
        f"trial work (one trial alone, 1 thread, {cal.finetune_epochs} fine-tune epochs): "
        f"{cal.trial_work_s:.2f} s  [{cal.epoch_s:.3f} s/epoch + {cal.fixed_s:.2f} s fixed]",
        f"{n} trials, concurrency {c}, 1 CPU per trial, model {args.model}, "
        f"baseline {args.baseline_epochs} epochs, seed {args.seed}; {args.repeats} round(s) "
        f"of {order}, in that order; medians",
        f"stack start-up (MLflow server, Ray head, API; not counted): {stack_start_s:.1f} s; "
        "before each run (after waiting for a quiet machine): CPU busy "
        f"{', '.join(f'{x:.0%}' for x in runs.busy)}; 1-min load average "
        f"{', '.join(f'{x:.2f}' for x in runs.load)}",
        "",
        "| path | wall s | baseline s | trials phase s | mean trial s |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, rs in (
        (f"bare, in-process Optuna n_jobs={c} (threads)", runs.bare),
        (f"bare, Optuna n_jobs={c} + {c} worker processes", runs.procs),
    ):
        for i, r in enumerate(rs):
            lines.append(
                f"| {label} #{i + 1} | {r.wall_s:.2f} | {r.baseline_s:.2f} | "
                f"{r.study_s:.2f} | {_mean(r.trial_s):.2f} |"
            )
    for i, r in enumerate(runs.svc):
        base = r.phases.get("float baseline (Ray task)", float("nan"))
        phase = r.phases.get("trials (first start to last end)", float("nan"))
        lines.append(
            f"| service: REST, driver, Ray, MLflow #{i + 1} | {r.wall_s:.2f} | {base:.2f} | "
            f"{phase:.2f} | {_mean(r.trial_s):.2f} |"
        )
    lines += [
        f"| ideal: bare baseline + ceil(N/C) x trial work | {ideal:.2f} | | | |",
        "",
        f"overhead_ratio = service / bare (threads) = {s_wall:.2f} / {b_wall:.2f} = "
        f"{ratio:.3f} (target <= {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'NOT met'}); "
        f"the service's extra time: {s_wall - b_wall:.1f} s",
    ]
    if p_wall is not None:
        lines.append(
            f"service / bare (processes) = {s_wall:.2f} / {p_wall:.2f} = {s_wall / p_wall:.3f}"
        )
    last = runs.svc[-1]
    lines += [
        f"service / ideal = {s_wall:.2f} / {ideal:.2f} = {s_wall / ideal:.3f}",
        "",
        f"Service wall time by phase (service run #{len(runs.svc)}):",
        "",
        "| phase | s |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in last.phases.items()]
    lines += [
        f"| **total (POST to terminal)** | **{last.wall_s:.2f}** |",
        "",
        f"Mean trial: service {_mean(last.trial_s):.2f} s inside the Ray worker (duration_s), "
        f"{_mean(last.trial_run_s):.2f} s as an MLflow run; bare (threads) "
        f"{_mean(runs.bare[-1].trial_s):.2f} s"
        + (f"; bare (processes) {_mean(runs.procs[-1].trial_s):.2f} s" if runs.procs else "")
        + f"; alone {cal.trial_work_s:.2f} s.",
    ]
    figures: dict[str, Any] = {
        "overhead_ratio": round(ratio, 3),
        "overhead_s": round(s_wall - b_wall, 2),
        "service_wall_s": round(s_wall, 2),
        "bare_wall_s": round(b_wall, 2),
        "trials": n,
        "concurrency": c,
        "trial_work_s": round(cal.trial_work_s, 2),
    }
    if p_wall is not None:
        figures["bare_processes_wall_s"] = round(p_wall, 2)
        figures["overhead_ratio_vs_processes"] = round(s_wall / p_wall, 3)
    figures.update(
        {
            "ideal_wall_s": round(ideal, 2),
            "finetune_epochs": cal.finetune_epochs,
            "baseline_epochs": args.baseline_epochs,
            "model": args.model,
            "repeats": args.repeats,
            "service_trial_mean_s": round(_mean(last.trial_s), 2),
            "bare_trial_mean_s": round(_mean(runs.bare[-1].trial_s), 2),
            "max_busy_before_run": round(max(runs.busy), 2),
        }
    )
    return "\n".join(lines), figures


def record(text: str, figures: dict[str, Any], command: str) -> None:
    """Rewrite this benchmark's section of docs/benchmarks.md; keep the others."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            SECTION,
            "",
            "The same search (same spec, seed, trials, concurrency, one CPU per trial) run "
            "through the whole service path (REST `POST /v1/jobs` → launcher → driver "
            "subprocess → Ray baseline task + Tune/OptunaSearch trials → MLflow server; "
            "timed from the POST until `GET /v1/jobs/{id}` is terminal) and through a bare "
            "in-process loop (`train_baseline` as a function, then `optuna` "
            "`study.optimize(n_jobs=concurrency)` with the service's sampler, each trial "
            "doing the same apply-policy → fine-tune → encode → evaluate work without Ray "
            "or MLflow). `overhead_ratio` = service wall time / bare wall time; "
            f"target <= {TARGET_RATIO}.",
            "",
            f"- Date: {stamp}",
            f"- Machine: {machine()}",
            f"- Command: `{command}`",
            "",
            "```text",
            text,
            "```",
            "",
            "Figures (the JSON line it prints last):",
            "",
            "```json",
            json.dumps(figures),
            "```",
            "",
        ]
    )
    _doc.record_section(DOC, SECTION, body)


# -- main ----------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--trials", type=int, default=None, help="trials per search (default: the spec's, 24)"
    )
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (default 2)")
    p.add_argument(
        "--trial-seconds", type=float, default=None, help="target work per trial (default 5)"
    )
    p.add_argument("--model", default="digits-cnn", choices=["digits-cnn", "digits-mlp"])
    p.add_argument("--baseline-epochs", type=int, default=None, help="default 5 (quick: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="alternate bare/service R times")
    p.add_argument("--quick", action="store_true", help="4 trials of ~2 s, baseline 2 epochs")
    p.add_argument("--record", action="store_true", help=f"rewrite its section of {DOC}")
    p.add_argument("--keep", action="store_true", help="keep the temporary SPARQ_HOME")
    p.add_argument("--no-processes", action="store_true", help="skip the process-pool bare variant")
    args = p.parse_args(argv)
    args.trials = args.trials or (4 if args.quick else SearchSpec().trials)
    args.trial_seconds = args.trial_seconds or (2.0 if args.quick else 5.0)
    args.baseline_epochs = args.baseline_epochs or (2 if args.quick else 5)
    for name in ("trials", "concurrency", "repeats", "baseline_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    if args.concurrency > (os.cpu_count() or 1):
        p.error(f"--concurrency {args.concurrency} exceeds this machine's {os.cpu_count()} CPUs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    print(f"machine: {machine()}", flush=True)
    print("calibrating the trial's work ...", flush=True)
    cal = calibrate(args)
    print(
        f"single trial alone: {cal.trial_work_s:.2f} s with {cal.finetune_epochs} fine-tune "
        f"epochs ({cal.epoch_s:.3f} s/epoch + {cal.fixed_s:.2f} s fixed)",
        flush=True,
    )
    spec = make_spec(args, cal.finetune_epochs)
    runs = Runs()
    with tempfile.TemporaryDirectory(prefix="sparq-bench-") as tmp:
        home = Path(tmp)
        with Stack(home) as s:
            print(f"stack up in {s.start_s:.1f} s (MLflow {s.mlflow_url}, API {s.url})", flush=True)
            for i in range(args.repeats):
                tag = f"[{i + 1}/{args.repeats}]"
                runs.busy.append(wait_quiet())
                runs.load.append(_load())
                runs.bare.append(run_bare(spec))
                print(f"{tag} bare (threads): {runs.bare[-1].wall_s:.2f} s", flush=True)
                if not args.no_processes:
                    runs.busy.append(wait_quiet())
                    runs.load.append(_load())
                    runs.procs.append(run_bare(spec, processes=True))
                    print(f"{tag} bare (processes): {runs.procs[-1].wall_s:.2f} s", flush=True)
                runs.busy.append(wait_quiet())
                runs.load.append(_load())
                runs.svc.append(run_service(spec, s.url, home, s.mlflow_url))
                print(f"{tag} service: {runs.svc[-1].wall_s:.2f} s", flush=True)
            start_s = s.start_s
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="sparq-bench-kept-"))
            os.rename(home, kept / "home")
            home.mkdir()
            print(f"kept SPARQ_HOME at {kept / 'home'}", flush=True)
    text, figures = render(args, cal, runs, start_s)
    print()
    print(text)
    if args.record:
        argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        record(text, figures, f".venv/bin/python bench/overhead.py {argv_text}".strip())
        print(f"\nrecorded in {DOC}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
