"""Multi-objective successive halving: rungs, promotion order against brute force,
and the stop decisions."""

from __future__ import annotations

import itertools
import random

import pytest

from dashboards import hypervolume_2d
from workers.search.scheduler import ParetoHalving, milestones, promotion_order


def test_milestones() -> None:
    assert milestones(10, 1, 3) == [1, 3, 9]
    assert milestones(9, 1, 3) == [1, 3]  # the last epoch is the trial's end, not a rung
    assert milestones(4, 2, 2) == [2]
    assert milestones(1, 1, 3) == []


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


@pytest.mark.parametrize("seed", range(20))
def test_promotion_order_puts_no_point_behind_one_it_dominates(seed: int) -> None:
    rng = random.Random(seed)
    pts = {f"t{i}": (rng.choice([0.1, 0.2, 0.3, 0.5]), rng.random()) for i in range(12)}
    order = promotion_order(pts)
    assert sorted(order) == sorted(pts)
    pos = {t: k for k, t in enumerate(order)}
    for a, b in itertools.permutations(pts, 2):
        if _dominates(pts[a], pts[b]):
            assert pos[a] < pos[b], (a, b)


def test_within_the_front_the_larger_hypervolume_contribution_goes_first() -> None:
    pts = {"lone": (0.1, 0.5), "crowd1": (0.5, 0.1), "crowd2": (0.52, 0.09)}
    ref = (1.1, 1.1)
    front = list(pts.values())

    def contrib(k: str) -> float:
        return hypervolume_2d(front, ref) - hypervolume_2d(
            [v for t, v in pts.items() if t != k], ref
        )

    order = promotion_order(pts)
    assert [contrib(t) for t in order] == sorted((contrib(t) for t in pts), reverse=True)
    assert order[0] == "lone"


def test_halving_keeps_the_best_third_and_stops_the_rest() -> None:
    s = ParetoHalving(epochs=9, grace=1, eta=3, baseline_size_bytes=1000)
    assert s.rungs.keys() == {1, 3}
    assert s.decide("a", 1, quality=0.90, size_bytes=100)  # fewer than eta: go on
    assert s.decide("b", 1, quality=0.95, size_bytes=100)
    assert not s.decide("c", 1, quality=0.50, size_bytes=200)  # dominated by a and b
    assert s.stopped == {"c": 1}
    assert s.decide("d", 1, quality=0.99, size_bytes=50)  # dominates everyone: best
    assert s.decide("e", 2, quality=0.0, size_bytes=10**6)  # not a rung: never stopped


def test_the_scheduler_reads_tune_results() -> None:
    from ray.tune.schedulers import TrialScheduler

    class T:
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    s = ParetoHalving(epochs=4, grace=1, eta=2, baseline_size_bytes=1000)
    r = {"accuracy": 0.9, "size_bytes": 100, "epoch": 1}
    assert s.on_trial_result(None, T("a"), r) == TrialScheduler.CONTINUE
    worse = {"accuracy": 0.5, "size_bytes": 200, "epoch": 1}
    assert s.on_trial_result(None, T("b"), worse) == TrialScheduler.STOP
    final = {"accuracy": 0.1, "size_bytes": 999, "final": True}
    assert s.on_trial_result(None, T("c"), final) == TrialScheduler.CONTINUE


def test_the_scheduler_ranks_by_the_fronts_quality_not_token_accuracy() -> None:
    """Language models report ``quality`` (1/perplexity, the front's axis): the rung
    ranks by it even where token accuracy would order the trials the other way."""
    from ray.tune.schedulers import TrialScheduler

    class T:
        def __init__(self, trial_id: str) -> None:
            self.trial_id = trial_id

    s = ParetoHalving(epochs=4, grace=1, eta=2, baseline_size_bytes=1000)
    a = {"accuracy": 0.40, "quality": 0.30, "size_bytes": 100, "epoch": 1}
    b = {"accuracy": 0.45, "quality": 0.20, "size_bytes": 100, "epoch": 1}  # better acc only
    assert s.on_trial_result(None, T("a"), a) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, T("b"), b) == TrialScheduler.STOP


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="eta >= 2"):
        ParetoHalving(epochs=4, grace=1, eta=1, baseline_size_bytes=10)


def test_rungs_kept_on_disk_are_read_back_by_a_resumed_scheduler(tmp_path) -> None:
    path = tmp_path / "rungs.json"
    first = ParetoHalving(epochs=4, grace=1, eta=2, baseline_size_bytes=1000, state_path=path)
    assert first.decide("a", 1, quality=0.9, size_bytes=100)
    assert not first.decide("b", 1, quality=0.5, size_bytes=200)
    again = ParetoHalving(epochs=4, grace=1, eta=2, baseline_size_bytes=1000, state_path=path)
    assert again.rungs == first.rungs
    assert again.stopped == {"b": 1}
    # compared with what reached the rung before the restart, not promoted for being first
    assert not again.decide("c", 1, quality=0.4, size_bytes=300)
    assert not list(tmp_path.glob("*.tmp"))
