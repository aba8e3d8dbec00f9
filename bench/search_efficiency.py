"""Search efficiency: hypervolume after n trials, the default search against random
search, and what multi-objective early stopping saves.

On the digits joint space (per-layer bits and sparsity, noise rate; the job spec's
defaults), for each seed, with the same trial work the service runs (apply the
policy to the shared float baseline, fine-tune, encode, evaluate the decoded
checkpoint) in one process, one trial at a time:

* ``random``: Optuna's RandomSampler, ``--trials`` trials (default 64);
* ``default``: the job spec's default sampler, the same number of trials;
* ``default+es``: the same sampler with ``ParetoHalving`` (the service's early
  stopping scheduler, its ``decide`` called at each rung exactly as Tune does) —
  stopped trials cost only the epochs they ran and are not points of the front.

Hypervolume is the service's: objectives ``(size / float size, 1 - accuracy)``,
reference point ``(1, 1)``, over completed (fully trained) trials only. Reported
(median over seeds): ``trials_to_match_random_64`` (trials the default search needs
to reach random search's final hypervolume; ``null`` if it never does),
``hv_ratio_at_16`` (default / random after 16 trials), the hypervolume of random
search at the default search's wall time, ``early_stop_speedup`` (wall time of
``default`` / ``default+es``) and ``early_stop_hv_kept`` (final hypervolume of
``default+es`` / ``default``). It writes a hypervolume-vs-trials plot and ends with
one JSON line of its figures.

Usage::

    .venv/bin/python bench/search_efficiency.py                  # 3 seeds x 64 trials
    .venv/bin/python bench/search_efficiency.py --seeds 1 --trials 16   # a quick look
    .venv/bin/python bench/search_efficiency.py --record         # also docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import torch  # noqa: E402

from bench._doc import record_section  # noqa: E402
from dashboards import FrontPoint, sparq_front  # noqa: E402
from search_spaces import KnobSpace, policy_from_params, to_optuna  # noqa: E402
from service.spec import JobSpec, SearchSpec  # noqa: E402
from workers.compress.train import evaluate, make_loader  # noqa: E402
from workers.jobs.baseline import (  # noqa: E402
    Baseline,
    ModelDescription,
    describe_model,
    knob_space,
    train_baseline,
)
from workers.jobs.trial import compress  # noqa: E402
from workers.search.sampling import make_sampler, resolve_sampler  # noqa: E402
from workers.search.scheduler import ParetoHalving  # noqa: E402
from workers.zoo.data import build_datasets  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Search efficiency (bench/search_efficiency.py)"
PLOT = ROOT / "docs" / "search_efficiency.png"


def make_spec(args: argparse.Namespace, seed: int, sampler: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "bench-search",
            "model": {"builtin": args.model},
            "dataset": {"builtin": "digits"},
            "baseline": {"epochs": args.baseline_epochs},
            "search_space": {"finetune_epochs": args.epochs},
            "search": {"trials": args.trials, "concurrency": 1, "seed": seed, "sampler": sampler},
        }
    )


class Stopped(Exception):
    pass


def trial(
    spec: JobSpec,
    space: KnobSpace,
    state: dict[str, Any],
    params: dict[str, Any],
    number: int,
    at_rung: Callable[[int, float, int], bool] | None,
) -> tuple[float, int]:
    """The service's trial work (``workers.jobs.trial.compress``, seeded as a trial is);
    ``at_rung(epoch, accuracy, size)`` may stop it after any fine-tune epoch."""
    cpu = torch.device("cpu")
    torch.manual_seed(spec.search.seed * 100_003 + number)
    _, val = build_datasets(spec.dataset)
    val_loader = make_loader(val, 512, shuffle=False)
    held: dict[str, Any] = {}

    def on_model(model: torch.nn.Module, encode_now: Callable[[], bytes]) -> None:
        held["model"], held["size"] = model, len(encode_now())  # the policy fixes the size

    def on_epoch(epoch: int, _loss: float) -> None:
        if at_rung is None:
            return
        r = evaluate(held["model"], val_loader, cpu)  # eval: every block quantized
        held["model"].train()
        if not at_rung(epoch + 1, r.accuracy, held["size"]):
            raise Stopped

    policy = policy_from_params(space, params)
    data, metrics = compress(
        spec, policy, state, cpu, seed=number, on_epoch=on_epoch, on_model=on_model
    )
    return float(metrics["accuracy"]), len(data)


@dataclass
class Run:
    name: str
    seed: int
    hv: list[float] = field(default_factory=list)  # after each trial (stopped ones too)
    elapsed: list[float] = field(default_factory=list)  # wall seconds after each trial
    stopped: int = 0
    knobs: int = 0


def _decide(es: ParetoHalving, trial_id: str, epoch: int, accuracy: float, size: int) -> bool:
    return es.decide(trial_id, epoch, accuracy, size)


def search(
    args: argparse.Namespace, seed: int, name: str, base: Baseline, model: ModelDescription
) -> Run:
    sampler = "random" if name == "random" else args.sampler
    spec = make_spec(args, seed, sampler)
    space = knob_space(spec, model)
    dists = to_optuna(space)
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=make_sampler(spec, len(dists))
    )
    es = None
    if name == "default+es":
        es = ParetoHalving(
            epochs=args.epochs, grace=args.grace, eta=args.eta,
            baseline_size_bytes=base.size_bytes,
        )  # fmt: skip
    run, points = Run(name, seed, knobs=len(dists)), []
    t0 = time.perf_counter()
    for n in range(1, args.trials + 1):
        t = study.ask(dists)
        at_rung = None
        if es is not None:
            at_rung = functools.partial(_decide, es, str(n))
        try:
            acc, size = trial(spec, space, base.state, t.params, n, at_rung)
        except Stopped:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
            run.stopped += 1
        else:
            study.tell(t, [acc, size])
            points.append(FrontPoint(str(n), acc, size))
        run.hv.append(sparq_front(points, base.size_bytes).hypervolume if points else 0.0)
        run.elapsed.append(time.perf_counter() - t0)
    return run


def one_seed(args: argparse.Namespace, seed: int) -> list[Run]:
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = make_spec(args, seed, args.sampler)
    base, model = train_baseline(spec.model_dump(mode="json")), describe_model(spec)
    return [search(args, seed, name, base, model) for name in ("random", "default", "default+es")]


def first_reaching(hv: list[float], target: float) -> int | None:
    return next((i + 1 for i, h in enumerate(hv) if h >= target - 1e-12), None)


def hv_at_time(run: Run, t: float) -> float:
    done = [h for h, e in zip(run.hv, run.elapsed, strict=True) if e <= t]
    return done[-1] if done else 0.0


def summarize(args: argparse.Namespace, runs: list[list[Run]]) -> tuple[str, dict[str, Any]]:
    n, k = args.trials, min(16, args.trials)
    rows, match, ratio16, hv_eq_time, speed, kept = [], [], [], [], [], []
    for rnd, dflt, es in runs:
        m = first_reaching(dflt.hv, rnd.hv[-1])
        match.append(m)
        ratio16.append(dflt.hv[k - 1] / rnd.hv[k - 1] if rnd.hv[k - 1] else float("inf"))
        hv_eq_time.append(hv_at_time(rnd, dflt.elapsed[-1]))
        speed.append(dflt.elapsed[-1] / es.elapsed[-1])
        kept.append(es.hv[-1] / dflt.hv[-1] if dflt.hv[-1] else float("nan"))
        rows.append(
            f"| {rnd.seed} | {rnd.hv[-1]:.4f} | {dflt.hv[k - 1]:.4f} / {rnd.hv[k - 1]:.4f} | "
            f"{dflt.hv[-1]:.4f} | {m if m is not None else f'> {n}'} | "
            f"{hv_eq_time[-1]:.4f} | {dflt.elapsed[-1]:.0f} / {es.elapsed[-1]:.0f} | "
            f"{es.hv[-1]:.4f} ({es.stopped} stopped) |"
        )
    matched = [m if m is not None else n + 1 for m in match]
    med_match = statistics.median(matched)
    figures = {
        "trials_to_match_random_64": None if med_match > n else med_match,
        "hv_ratio_at_16": round(statistics.median(ratio16), 4),
        "early_stop_speedup": round(statistics.median(speed), 3),
        "early_stop_hv_kept": round(statistics.median(kept), 4),
        "random_hv_final": round(statistics.median(r[0].hv[-1] for r in runs), 4),
        "default_hv_final": round(statistics.median(r[1].hv[-1] for r in runs), 4),
        "random_hv_at_default_wall_time": round(statistics.median(hv_eq_time), 4),
        "trials": n,
        "seeds": len(runs),
        "sampler": args.sampler,
        "sampler_resolved": resolve_sampler(make_spec(args, 0, args.sampler), runs[0][1].knobs),
        "model": args.model,
        "finetune_epochs": args.epochs,
        "eta": args.eta,
        "grace": args.grace,
    }
    text = "\n".join(
        [
            f"{len(runs)} seeds x {n} trials, model {args.model}, {args.epochs} fine-tune epochs, "
            f"sampler {args.sampler!r}; early stopping eta={args.eta}, grace={args.grace}; "
            "hypervolume of (size / float size, 1 - accuracy), reference (1, 1)",
            "",
            f"| seed | random HV@{n} | default / random HV@{k} | default HV@{n} | "
            f"default trials to random HV@{n} | random HV at default's wall time | "
            f"wall s default / +es | +es HV@{n} |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    return text, figures


def plot(runs: list[list[Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"random": "tab:gray", "default": "tab:blue", "default+es": "tab:orange"}
    for seed_runs in runs:
        for r in seed_runs:
            label = r.name if r.seed == runs[0][0].seed else None
            ax.plot(range(1, len(r.hv) + 1), r.hv, color=colors[r.name], alpha=0.8, label=label)
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume (reference (1, 1))")
    ax.set_title("Hypervolume vs trials, digits joint space (one line per seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record(text: str, figures: dict[str, Any], command: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(
        [
            SECTION, "", __doc__.split("\n\n")[1].strip(), "",
            f"- Date: {stamp}", f"- Command: `{command}`", "",
            "```text", text, "```", "",
            f"![hypervolume vs trials]({PLOT.name})", "",
            "```json", json.dumps(figures), "```", "",
        ]
    )  # fmt: skip
    record_section(DOC, SECTION, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--sampler", default=SearchSpec().sampler, help="default: the spec's")
    p.add_argument("--model", default="digits-mlp", choices=["digits-mlp", "digits-cnn"])
    p.add_argument("--epochs", type=int, default=4, help="fine-tune epochs per trial")
    p.add_argument("--baseline-epochs", type=int, default=15)
    p.add_argument("--eta", type=int, default=3)
    p.add_argument("--grace", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="seeds run in parallel processes")
    p.add_argument("--record", action="store_true")
    args = p.parse_args(argv)
    if args.trials < 16:
        p.error(f"--trials must be >= 16 (hv_ratio_at_16), but got {args.trials}")
    seeds = list(range(args.seeds))
    with ProcessPoolExecutor(max_workers=max(1, min(args.jobs, len(seeds)))) as pool:
        runs = list(pool.map(one_seed, [args] * len(seeds), seeds))
    text, figures = summarize(args, runs)
    plot(runs, PLOT)
    print(text)
    print(f"plot: {PLOT}")
    if args.record:
        cmd = ".venv/bin/python bench/search_efficiency.py " + " ".join(sys.argv[1:])
        record(text, figures, cmd.strip())
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
