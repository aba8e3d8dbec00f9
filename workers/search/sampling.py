"""Optuna samplers for the search, and constraints told to them.

``make_sampler`` turns ``search.sampler`` into a seeded Optuna sampler: TPE
(multivariate, constant liar so parallel trials spread out), NSGA-II, Optuna's GP
sampler, random, or ``auto``, which picks one from the budget and the number of
knobs. :class:`ConstrainedOptunaSearch` tells the sampler which trials broke the
job's constraints (quality drop, size) through ``Trial.set_constraint``; Optuna's
TPE, NSGA-II and GP samplers rank infeasible trials behind feasible ones. The drop is
on the task's quality axis (``dashboards.quality``: accuracy, or exp(-loss) for
language modelling), the axis the export's constraint is on.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

from dashboards import baseline_quality, quality_drop_constraint
from service.spec import JobSpec

GP_MAX_TRIALS, GP_MAX_KNOBS, NSGA2_MIN_TRIALS = 64, 24, 500


def resolve_sampler(spec: JobSpec, n_knobs: int) -> str:
    """``auto``: the GP sampler for small budgets over few knobs (it is the most
    sample-efficient there, and its cost grows with the cube of the trials), NSGA-II
    for budgets of many generations, TPE in between. Any other choice is kept."""
    name = spec.search.sampler
    if name != "auto":
        return name
    if spec.search.trials <= GP_MAX_TRIALS and n_knobs <= GP_MAX_KNOBS:
        return "gp"
    return "nsga2" if spec.search.trials >= NSGA2_MIN_TRIALS else "tpe"


def make_sampler(spec: JobSpec, n_knobs: int) -> Any:
    import optuna

    seed, name = spec.search.seed, resolve_sampler(spec, n_knobs)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(
            seed=seed,
            n_startup_trials=min(10, spec.search.trials // 3 + 1),
        )
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=True,
        constant_liar=True,
        n_startup_trials=min(10, spec.search.trials // 3 + 1),
    )


def constraint_values(result: dict[str, Any], spec: JobSpec, baseline: float) -> dict[str, float]:
    """One value per constraint of the job, <= 0 when the trial meets it; ``baseline``
    is the float baseline's quality (the task's axis, as the export's floor)."""
    c = spec.constraints
    out = {}
    if c.max_accuracy_drop is not None:
        out["max_accuracy_drop"] = quality_drop_constraint(
            spec.task, result, baseline, c.max_accuracy_drop
        )
    if c.max_size_bytes is not None:
        out["max_size_bytes"] = float(result["size_bytes"]) - c.max_size_bytes
    return out


class ConstrainedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that records, before telling Optuna a trial's values, how far
    the trial is from the job's constraints, so constrained samplers steer away."""

    def __init__(self, *args: Any, spec: JobSpec, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._sparq_spec = spec

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        ot_trial, spec = self._ot_trials.get(trial_id), self._sparq_spec
        if result and result.get("final") is False:  # stopped early: pruned, not measured
            super().on_trial_complete(trial_id, None, error=False)
            return
        if result and result.get("failed"):  # the trial's own work failed: told as failed
            super().on_trial_complete(trial_id, None, error=True)
            return
        if ot_trial is not None and result and "accuracy" in result:
            # every trial reports the float baseline it started from (the search starts
            # while the baseline trains, so the driver does not know it up front)
            baseline = baseline_quality(spec.task, result)
            if baseline is None:
                raise KeyError(f"trial {trial_id} reported no baseline_accuracy")
            for key, value in constraint_values(result, spec, baseline).items():
                ot_trial.set_constraint(key, value)  # Optuna >= 5: samplers read these
        super().on_trial_complete(trial_id, result, error)
