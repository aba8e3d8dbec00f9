"""Samplers: every choice builds and samples a two-objective study, ``auto`` follows
its rule, and constraints reach Optuna for the trials that break them."""

from __future__ import annotations

import optuna
import pytest

from search_spaces import KnobSpace, LayerInfo, to_optuna
from service.spec import JobSpec
from workers.search.sampling import (
    ConstrainedOptunaSearch,
    constraint_values,
    make_sampler,
    resolve_sampler,
)

MINIMAL = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}


def _spec(**search: object) -> JobSpec:
    return JobSpec.model_validate({**MINIMAL, "search": search})


def _dists() -> dict[str, optuna.distributions.BaseDistribution]:
    space = KnobSpace.model_validate(
        {
            "layers": [LayerInfo(name=f"l{i}", kind="linear", numel=64) for i in range(2)],
            "weight_bits": [2, 4, 8],
            "sparsity_low": 0.0,
            "sparsity_high": 0.9,
            "noise_rate_low": 0.1,
            "noise_rate_high": 1.0,
            "noise_block": 4,
        }
    )
    return to_optuna(space)


@pytest.mark.parametrize(
    ("sampler", "trials", "knobs", "expected"),
    [
        ("auto", 24, 9, "gp"),
        ("auto", 64, 24, "gp"),
        ("auto", 65, 9, "tpe"),
        ("auto", 24, 25, "tpe"),
        ("auto", 500, 9, "nsga2"),
        ("tpe", 500, 9, "tpe"),
        ("random", 3, 3, "random"),
    ],
)
def test_auto_picks_by_budget_and_knobs(sampler: str, trials: int, knobs: int, expected: str):
    assert resolve_sampler(_spec(sampler=sampler, trials=trials), knobs) == expected


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_runs_a_seeded_two_objective_study(name: str) -> None:
    def run() -> list[dict[str, object]]:
        spec = _spec(sampler=name, trials=6, seed=7)
        dists = _dists()
        study = optuna.create_study(
            directions=["maximize", "minimize"], sampler=make_sampler(spec, len(dists))
        )
        for _ in range(6):
            t = study.ask(dists)
            acc = 1.0 - float(t.params["l0.sparsity"]) / 2
            study.tell(t, [acc, float(t.params["l0.bits"]) * 100])
        return [t.params for t in study.trials]

    first = run()
    assert len(first) == 6
    assert first == run()  # seeded: the same trials again


def test_constraint_values_are_positive_only_when_broken() -> None:
    spec = JobSpec.model_validate(
        {**MINIMAL, "constraints": {"max_accuracy_drop": 0.02, "max_size_bytes": 1000}}
    )
    ok = constraint_values({"accuracy": 0.95, "size_bytes": 900}, spec, 0.96)
    assert all(v <= 0 for v in ok.values())
    bad = constraint_values({"accuracy": 0.90, "size_bytes": 1200}, spec, 0.96)
    assert bad == pytest.approx({"max_accuracy_drop": 0.04, "max_size_bytes": 200.0})
    unconstrained = JobSpec.model_validate({**MINIMAL, "constraints": {"max_accuracy_drop": None}})
    assert constraint_values({"accuracy": 0.0, "size_bytes": 1}, unconstrained, 1.0) == {}


def test_the_searcher_tells_optuna_which_trials_break_constraints() -> None:
    spec = _spec(sampler="tpe", trials=4, seed=1)
    dists = _dists()
    searcher = ConstrainedOptunaSearch(
        space=dists,
        metric=["accuracy", "size_bytes"],
        mode=["max", "min"],
        sampler=make_sampler(spec, len(dists)),
        spec=spec,
    )
    assert searcher.suggest("a") is not None
    assert searcher.suggest("b") is not None
    base = {"size_bytes": 100, "baseline_accuracy": 0.95}
    searcher.on_trial_complete("a", {"accuracy": 0.80, **base})  # 15 points lost
    searcher.on_trial_complete("b", {"accuracy": 0.95, **base})
    a, b = searcher._ot_study.trials
    # what Optuna's samplers read to rank infeasible trials behind feasible ones
    assert a.constraints == pytest.approx({"max_accuracy_drop": 0.14})
    assert b.constraints == pytest.approx({"max_accuracy_drop": -0.01})
    assert optuna.study._constrained_optimization._get_feasible_trials([a, b]) == [b]
