"""Service overhead: the same search through the whole service and in bare loops, side by side.

The same trial (fixed, realistic work: apply a policy to the float baseline,
fine-tune, encode, evaluate the decoded checkpoint) is run ``--trials`` times

* through the whole service path: REST ``POST /v1/jobs`` -> launcher -> search
  driver subprocess -> Ray (baseline task, Tune + OptunaSearch trials) -> MLflow
  server, timed from the POST until ``GET /v1/jobs/{id}`` says the job is terminal;
* through a bare loop with a process pool (the fair reference: its trials, like
  Ray's, do not share one GIL): ``train_baseline`` as a plain function, then
  ``optuna`` with the service's sampler, ``study.optimize(n_jobs=concurrency)``
  whose objective hands the trial's work (minus Ray and MLflow) to one of
  ``concurrency`` spawned worker processes, started inside the timed region;
* through the same loop with the work in Optuna's threads (the second row: one GIL).

The pool's workers run at Ray's worker niceness (15, ``--pool-nice``): on a machine
someone else loads, Ray's trials yield to that load, and the reference must yield alike
(on a quiet machine niceness changes nothing).

Both use the same spec (model, baseline epochs, fine-tune epochs, seed, one CPU per
trial, the same concurrency; early stopping off, as the bare loops have none). The
fine-tune epochs are calibrated first so that one trial, alone on one thread, takes
about ``--trial-seconds``. The three paths alternate over ``--rounds`` rounds, the
order rotated each round (processes, service, threads; then service, threads,
processes; ...), so that drift in the machine's load falls on each path alike; each
round gives its own ratios and the report gives their median and range.

Two sizes: the default search (24 trials of about 5 s: the service's fixed cost per
job shows) and ``--long-trials`` trials of about ``--long-seconds`` s (30: the
per-trial cost dominates). For each size:

* ``overhead_ratio_vs_processes`` = service wall / process-pool wall, per round; the
  median of rounds is the figure (``overhead_ratio`` is the same against threads);
* ``per_trial_overhead_ratio`` = median trial duration inside the Ray worker
  (``duration_s``) / median trial duration inside the pool's worker process;
* ``fixed_overhead_s`` = service wall - pool wall - the part slower trials explain,
  ``ceil(N/C) x (median service trial - median pool trial)``: what a job costs on
  top of its trials (driver, Ray, Tune start-up, export, polling);
  ``fixed_overhead_ratio`` = (pool wall + fixed) / pool wall.

Stack start-up (MLflow server, Ray head, API) is not counted in either path.

Usage (from the repository root)::

    .venv/bin/python bench/overhead.py                      # both sizes, 3 rounds each
    .venv/bin/python bench/overhead.py --quick              # 4 x ~2 s and 2 x ~6 s, 1 round
    .venv/bin/python bench/overhead.py --rounds 1 --trials 8 --no-long
    .venv/bin/python bench/overhead.py --record             # also rewrite its section of
                                                            # docs/benchmarks.md

The last line printed is one JSON object of the figures (the long size's under
``long``).
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
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

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

if TYPE_CHECKING:
    # Optuna and Ray Tune (the sampler) are imported where used: the process pool's
    # workers import this module (spawn), and its reference would pay seconds of
    # imports a Ray trial worker does not.
    import optuna

TERMINAL = {"succeeded", "failed", "cancelled"}
TARGETS = {"short": 1.10, "long": 1.03}  # overhead_ratio_vs_processes, median of rounds
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Service overhead (bench/overhead.py)"


# -- the spec and the trial's work ---------------------------------------------
@dataclass(frozen=True)
class Size:
    """One size of search: ``trials`` trials of about ``trial_seconds`` each."""

    name: str  # "short" (the default search) or "long"
    trials: int
    trial_seconds: float


def make_spec(args: argparse.Namespace, size: Size, finetune_epochs: int) -> JobSpec:
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
                "trials": size.trials,
                "concurrency": args.concurrency,
                "seed": args.seed,
                "sampler": "tpe",
                "early_stopping": {"enabled": False},  # the bare loops stop nothing early
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


def calibrate(args: argparse.Namespace, size: Size) -> Calibration:
    """Pick fine-tune epochs so one trial takes about ``size.trial_seconds`` alone."""
    spec = make_spec(args, size, finetune_epochs=1)
    base = train_baseline(spec.model_dump(mode="json"))  # also warms imports and caches
    space = knob_space(spec, describe_model(spec))
    params = middle_params(space)
    trial_work(spec, space, base.state, params, 1, epochs=1)  # warm-up
    t0 = time.perf_counter()
    trial_work(spec, space, base.state, params, 1, epochs=0)
    fixed = time.perf_counter() - t0
    probe, took = 3, []
    for _ in range(2):  # the faster of two: a busy second says less about the work
        t0 = time.perf_counter()
        trial_work(spec, space, base.state, params, 1, epochs=probe)
        took.append(time.perf_counter() - t0)
    epoch_s = max(1e-3, (min(took) - fixed) / probe)
    epochs = max(1, round((size.trial_seconds - fixed) / epoch_s))
    spec = make_spec(args, size, finetune_epochs=epochs)
    t0 = time.perf_counter()
    trial_work(spec, space, base.state, params, 1)
    return Calibration(epochs, epoch_s, fixed, time.perf_counter() - t0)


# -- bare path -------------------------------------------------------------------
@dataclass
class BareRun:
    wall_s: float
    baseline_s: float
    study_s: float
    trial_s: list[float] = field(default_factory=list)  # each trial's work, where it ran


def suggest(trial: optuna.Trial, dists: dict[str, Any]) -> dict[str, Any]:
    """Sample every knob from the distributions the service hands to OptunaSearch."""
    import optuna

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


RAY_WORKER_NICENESS = 15  # Ray's default (RAY_worker_niceness): its workers run at nice 15


def pool_niceness() -> int:
    """The niceness of the pool's workers: that of Ray's, so that on a machine someone
    else loads both references yield to that load alike (on a quiet one it changes
    nothing)."""
    return int(os.environ.get("RAY_worker_niceness", RAY_WORKER_NICENESS))


def _init_worker(spec_json: dict[str, Any], model: ModelDescription, state: Any, nice: int) -> None:
    if nice:
        os.nice(nice)
    torch.set_num_threads(1)
    spec = JobSpec.model_validate(spec_json)
    _WORKER.update(spec=spec, space=knob_space(spec, model), state=state)


def _work_in_worker(params: dict[str, Any], number: int) -> tuple[tuple[float, int], float]:
    """The trial's work in a pool process, and its duration there (as the service's
    ``duration_s`` is measured inside the Ray worker)."""
    t0 = time.perf_counter()
    out = trial_work(_WORKER["spec"], _WORKER["space"], _WORKER["state"], params, number)
    return out, time.perf_counter() - t0


def run_bare(spec: JobSpec, *, processes: bool = False, nice: int = 0) -> BareRun:
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
            initargs=(spec_json, model, base.state, nice),
        )

    def objective(trial: optuna.Trial) -> tuple[float, int]:
        params = suggest(trial, dists)
        # Ray names trials trial-001, trial-002, ...: the same seeds here.
        if pool is None:
            started = time.perf_counter()
            out = trial_work(spec, space, base.state, params, trial.number + 1)
            took = time.perf_counter() - started
        else:
            out, took = pool.submit(_work_in_worker, params, trial.number + 1).result()
        with lock:
            durations.append(took)
        return out

    import optuna

    from workers.search.sampling import make_sampler

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
    import optuna

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


PATHS = ("processes", "service", "threads")  # round k runs them rotated by k


@dataclass
class Round:
    """One round of a size: each path once, in ``order``."""

    order: tuple[str, ...]
    procs: BareRun | None = None
    threads: BareRun | None = None
    svc: ServiceRun | None = None
    busy: list[float] = field(default_factory=list)  # CPU busy fraction before each run
    load: list[float] = field(default_factory=list)  # 1-min load average before each run

    def figures(self, n: int, c: int) -> dict[str, float]:
        """This round's ratios (service against the pool of the same round)."""
        s, p = self.svc, self.procs
        if s is None or p is None:
            raise RuntimeError(f"a round without the service or the pool ran: {self.order}")
        s_trial, p_trial = statistics.median(s.trial_s), statistics.median(p.trial_s)
        explained = math.ceil(n / c) * (s_trial - p_trial)
        fixed = s.wall_s - p.wall_s - explained
        out = {
            "service_wall_s": s.wall_s,
            "processes_wall_s": p.wall_s,
            "overhead_ratio_vs_processes": s.wall_s / p.wall_s,
            "service_trial_s": s_trial,
            "processes_trial_s": p_trial,
            "per_trial_overhead_ratio": s_trial / p_trial,
            "per_trial_overhead_s": explained,
            "fixed_overhead_s": fixed,
            "fixed_overhead_ratio": (p.wall_s + fixed) / p.wall_s,
        }
        if self.threads is not None:
            out["threads_wall_s"] = self.threads.wall_s
            out["threads_trial_s"] = statistics.median(self.threads.trial_s)
            out["overhead_ratio"] = s.wall_s / self.threads.wall_s
        return out


@dataclass
class SizeResult:
    size: Size
    cal: Calibration
    rounds: list[Round]


def run_size(args: argparse.Namespace, size: Size, stk: Stack, home: Path) -> SizeResult:
    print(f"[{size.name}] calibrating the trial's work ...", flush=True)
    cal = calibrate(args, size)
    print(
        f"[{size.name}] one trial alone: {cal.trial_work_s:.2f} s with {cal.finetune_epochs} "
        f"fine-tune epochs ({cal.epoch_s:.3f} s/epoch + {cal.fixed_s:.2f} s fixed)",
        flush=True,
    )
    spec = make_spec(args, size, cal.finetune_epochs)
    paths = [p for p in PATHS if not (p == "threads" and args.no_threads)]
    rounds: list[Round] = []
    for k in range(args.rounds):
        order = tuple(paths[k % len(paths) :] + paths[: k % len(paths)])
        rnd = Round(order)
        for path in order:
            rnd.busy.append(wait_quiet(timeout_s=args.quiet_timeout))
            rnd.load.append(_load())
            if path == "processes":
                rnd.procs = run_bare(spec, processes=True, nice=args.pool_nice)
                wall = rnd.procs.wall_s
            elif path == "threads":
                rnd.threads = run_bare(spec)
                wall = rnd.threads.wall_s
            else:
                rnd.svc = run_service(spec, stk.url, home, stk.mlflow_url)
                wall = rnd.svc.wall_s
            print(f"[{size.name} {k + 1}/{args.rounds}] {path}: {wall:.2f} s", flush=True)
        f = rnd.figures(size.trials, args.concurrency)
        print(
            f"[{size.name} {k + 1}/{args.rounds}] service / processes = "
            f"{f['overhead_ratio_vs_processes']:.3f}",
            flush=True,
        )
        rounds.append(rnd)
    return SizeResult(size, cal, rounds)


def _med(rs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def size_figures(res: SizeResult, args: argparse.Namespace) -> dict[str, Any]:
    """The size's figures: medians of rounds, with the ratio's range and every round."""
    per = [r.figures(res.size.trials, args.concurrency) for r in res.rounds]
    ratios = [r["overhead_ratio_vs_processes"] for r in per]
    out: dict[str, Any] = {
        "overhead_ratio_vs_processes": round(statistics.median(ratios), 3),
        "overhead_ratio_vs_processes_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "overhead_ratio_vs_processes_spread": round(max(ratios) - min(ratios), 3),
    }
    if "overhead_ratio" in per[0]:
        threads = [r["overhead_ratio"] for r in per]
        out["overhead_ratio"] = round(statistics.median(threads), 3)
        out["overhead_ratio_range"] = [round(min(threads), 3), round(max(threads), 3)]
    for key in (
        "fixed_overhead_s",
        "fixed_overhead_ratio",
        "per_trial_overhead_ratio",
        "per_trial_overhead_s",
        "service_wall_s",
        "processes_wall_s",
        "service_trial_s",
        "processes_trial_s",
    ):
        out[key] = round(_med(per, key), 3)
    out.update(
        {
            "target_vs_processes": TARGETS[res.size.name],
            "met": statistics.median(ratios) <= TARGETS[res.size.name],
            "trials": res.size.trials,
            "concurrency": args.concurrency,
            "trial_work_s": round(res.cal.trial_work_s, 2),
            "finetune_epochs": res.cal.finetune_epochs,
            "rounds": [{k: round(v, 3) for k, v in r.items()} for r in per],
        }
    )
    return out


def render_size(res: SizeResult, args: argparse.Namespace) -> str:
    n, c, cal = res.size.trials, args.concurrency, res.cal
    fig = size_figures(res, args)
    lines = [
        f"### {res.size.name}: {n} trials of ~{res.size.trial_seconds:g} s, concurrency {c}",
        "",
        f"trial work (one trial alone, 1 thread, {cal.finetune_epochs} fine-tune epochs): "
        f"{cal.trial_work_s:.2f} s  [{cal.epoch_s:.3f} s/epoch + {cal.fixed_s:.2f} s fixed]",
        "",
        "| round | order | processes s | service s | threads s | service / processes | "
        "service / threads | trial s (svc / pool) | per-trial ratio | fixed s | "
        "busy before |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, (rnd, f) in enumerate(zip(res.rounds, fig["rounds"], strict=True)):
        threads = f.get("threads_wall_s")
        lines.append(
            f"| {k + 1} | {', '.join(rnd.order)} | {f['processes_wall_s']:.2f} | "
            f"{f['service_wall_s']:.2f} | {'' if threads is None else f'{threads:.2f}'} | "
            f"{f['overhead_ratio_vs_processes']:.3f} | "
            f"{'' if threads is None else format(f['overhead_ratio'], '.3f')} | "
            f"{f['service_trial_s']:.2f} / {f['processes_trial_s']:.2f} | "
            f"{f['per_trial_overhead_ratio']:.3f} | {f['fixed_overhead_s']:.2f} | "
            f"{', '.join(f'{b:.0%}' for b in rnd.busy)} |"
        )
    lo, hi = fig["overhead_ratio_vs_processes_range"]
    target = TARGETS[res.size.name]
    lines += [
        "",
        f"overhead_ratio_vs_processes (median of {len(res.rounds)} rounds) = "
        f"{fig['overhead_ratio_vs_processes']:.3f} (range {lo:.3f} to {hi:.3f}; target <= "
        f"{target}: {'met' if fig['met'] else 'NOT met'})",
    ]
    if "overhead_ratio" in fig:
        tlo, thi = fig["overhead_ratio_range"]
        lines.append(
            f"overhead_ratio (service / threads, median) = {fig['overhead_ratio']:.3f} "
            f"(range {tlo:.3f} to {thi:.3f})"
        )
    lines += [
        f"per trial: {fig['service_trial_s']:.2f} s in Ray against {fig['processes_trial_s']:.2f}"
        f" s in the pool (medians): per_trial_overhead_ratio {fig['per_trial_overhead_ratio']:.3f}"
        f", {fig['per_trial_overhead_s']:.1f} s of the job's wall time",
        f"fixed: {fig['fixed_overhead_s']:.1f} s per job (fixed_overhead_ratio "
        f"{fig['fixed_overhead_ratio']:.3f})",
        "",
        f"Service wall time by phase (round {len(res.rounds)}):",
        "",
        "| phase | s |",
        "|---|---:|",
    ]
    last = res.rounds[-1].svc
    if last is None:
        raise RuntimeError("the last round has no service run")
    lines += [f"| {k} | {v:.2f} |" for k, v in last.phases.items()]
    lines.append(f"| **total (POST to terminal)** | **{last.wall_s:.2f}** |")
    return "\n".join(lines)


def render(results: list[SizeResult], args: argparse.Namespace, stack_start_s: float) -> str:
    head = [
        f"model {args.model}, baseline {args.baseline_epochs} epochs, seed {args.seed}, "
        f"1 CPU per trial, early stopping off; {args.rounds} round(s) per size, the order "
        f"of the paths rotated each round; the pool's workers at nice {args.pool_nice} "
        f"(Ray's workers: nice {pool_niceness()}), the thread loop at the bench's own",
        f"stack start-up (MLflow server, Ray head, API; not counted): {stack_start_s:.1f} s",
        "",
    ]
    return "\n".join([*head, "\n\n".join(render_size(r, args) for r in results)])


def figures(results: list[SizeResult], args: argparse.Namespace) -> dict[str, Any]:
    """The JSON line: the first size's figures at the top level, the long size's under
    ``long``."""
    out: dict[str, Any] = {}
    for res in results:
        fig = size_figures(res, args)
        if res.size.name == "short" or not out:
            out.update(fig)
        else:
            out[res.size.name] = fig
    out.update(
        {
            "model": args.model,
            "baseline_epochs": args.baseline_epochs,
            "rounds_per_size": args.rounds,
            "pool_nice": args.pool_nice,
            "machine": machine(),
        }
    )
    return out


def record(text: str, figs: dict[str, Any], command: str, note: str) -> None:
    """Rewrite this benchmark's section of docs/benchmarks.md; keep the others."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            SECTION,
            "",
            "The same search (same spec, seed, trials, concurrency, one CPU per trial, early "
            "stopping off) run through the whole service path (REST `POST /v1/jobs` → "
            "launcher → driver subprocess → Ray baseline task + Tune/OptunaSearch trials → "
            "MLflow server; timed from the POST until `GET /v1/jobs/{id}` is terminal) and "
            "through bare loops (`train_baseline` as a function, then `optuna` "
            "`study.optimize(n_jobs=concurrency)` with the service's sampler, each trial "
            "doing the same apply-policy → fine-tune → encode → evaluate work without Ray "
            "or MLflow) in a process pool (the reference) and in threads. The paths "
            "alternate over rounds; figures are medians of rounds, every round shown. "
            f"Targets: service / processes <= {TARGETS['short']} (24 trials of ~5 s) and "
            f"<= {TARGETS['long']} (long trials).",
            "",
            f"- Date: {stamp}",
            f"- Machine: {machine()}",
            f"- Command: `{command}`",
            *([f"- Note: {note}"] if note else []),
            "",
            "```text",
            text,
            "```",
            "",
            "Figures (the JSON line it prints last):",
            "",
            "```json",
            json.dumps(figs),
            "```",
            "",
        ]
    )
    _doc.record_section(DOC, SECTION, body)


# -- main ----------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--trials", type=int, default=None, help="trials of the short size (default 24; quick 4)"
    )
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (default 2)")
    p.add_argument(
        "--trial-seconds", type=float, default=None, help="short size's trial (default 5; quick 2)"
    )
    p.add_argument(
        "--long-trials", type=int, default=None, help="trials of the long size (default 6; quick 2)"
    )
    p.add_argument(
        "--long-seconds", type=float, default=None, help="long size's trial (default 30; quick 6)"
    )
    p.add_argument("--no-long", action="store_true", help="only the short size")
    p.add_argument("--no-short", action="store_true", help="only the long size")
    p.add_argument("--no-threads", action="store_true", help="skip the thread-loop row")
    p.add_argument(
        "--pool-nice",
        type=int,
        default=None,
        help="niceness of the pool's workers (default: Ray's worker niceness, 15)",
    )
    p.add_argument("--model", default="digits-cnn", choices=["digits-cnn", "digits-mlp"])
    p.add_argument("--baseline-epochs", type=int, default=None, help="default 5 (quick: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None, help="rounds per size (default 3; quick 1)")
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a quiet machine before each run (default 60)",
    )
    p.add_argument("--quick", action="store_true", help="a small configuration, one round")
    p.add_argument("--record", action="store_true", help=f"rewrite its section of {DOC}")
    p.add_argument("--note", default="", help="a line for the record (e.g. the machine was shared)")
    p.add_argument("--keep", action="store_true", help="keep the temporary SPARQ_HOME")
    args = p.parse_args(argv)
    q = args.quick
    args.trials = args.trials or (4 if q else SearchSpec().trials)
    args.trial_seconds = args.trial_seconds or (2.0 if q else 5.0)
    args.long_trials = args.long_trials or (2 if q else 6)
    args.long_seconds = args.long_seconds or (6.0 if q else 30.0)
    args.baseline_epochs = args.baseline_epochs or (2 if q else 5)
    args.rounds = args.rounds or (1 if q else 3)
    args.pool_nice = pool_niceness() if args.pool_nice is None else args.pool_nice
    for name in ("trials", "long_trials", "concurrency", "rounds", "baseline_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    if args.no_long and args.no_short:
        p.error("--no-long and --no-short leave nothing to run; drop one")
    if args.concurrency > (os.cpu_count() or 1):
        p.error(f"--concurrency {args.concurrency} exceeds this machine's {os.cpu_count()} CPUs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    print(f"machine: {machine()}", flush=True)
    sizes = [
        *([] if args.no_short else [Size("short", args.trials, args.trial_seconds)]),
        *([] if args.no_long else [Size("long", args.long_trials, args.long_seconds)]),
    ]
    results: list[SizeResult] = []
    with tempfile.TemporaryDirectory(prefix="sparq-bench-") as tmp:
        home = Path(tmp)
        with Stack(home) as s:
            print(f"stack up in {s.start_s:.1f} s (MLflow {s.mlflow_url}, API {s.url})", flush=True)
            for size in sizes:
                results.append(run_size(args, size, s, home))
                # each size's report as soon as it is done: a long run cut short keeps it
                print("\n" + render_size(results[-1], args) + "\n", flush=True)
                print(json.dumps(size_figures(results[-1], args)), flush=True)
            start_s = s.start_s
        if args.keep:
            kept = Path(tempfile.mkdtemp(prefix="sparq-bench-kept-"))
            os.rename(home, kept / "home")
            home.mkdir()
            print(f"kept SPARQ_HOME at {kept / 'home'}", flush=True)
    text = render(results, args, start_s)
    figs = figures(results, args)
    print()
    print(text)
    if args.record:
        argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        record(text, figs, f".venv/bin/python bench/overhead.py {argv_text}".strip(), args.note)
        print(f"\nrecorded in {DOC}")
    print(json.dumps(figs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
