"""Front math against brute force on random inputs."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from dashboards import (
    FrontPoint,
    choose,
    hypervolume_2d,
    hypervolume_history,
    knee_index,
    max_accuracy_under,
    min_size_above,
    non_dominated_ranks,
    pareto_indices,
    sparq_front,
)


def _brute_front(values: list[tuple[float, float]]) -> set[int]:
    def dominated(i: int) -> bool:
        return any(
            all(a <= b for a, b in zip(values[j], values[i], strict=True))
            and values[j] != values[i]
            for j in range(len(values))
        )

    return {i for i in range(len(values)) if not dominated(i)}


def _brute_hv(values: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Exact area on the grid the points induce (union of rectangles)."""
    xs = sorted({v[0] for v in values if v[0] < ref[0]} | {ref[0]})
    ys = sorted({v[1] for v in values if v[1] < ref[1]} | {ref[1]})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(itertools.pairwise(xs), itertools.pairwise(ys)):
        if any(v[0] <= x0 and v[1] <= y0 for v in values):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(30))
def test_front_and_hypervolume_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    values = [(round(rng.random(), 2), round(rng.random(), 2)) for _ in range(n)]  # ties too
    assert set(pareto_indices(values)) == _brute_front(values)
    assert hypervolume_2d(values, (1.0, 1.0)) == pytest.approx(_brute_hv(values, (1.0, 1.0)))


@pytest.mark.parametrize("seed", range(10))
def test_ranks_peel_fronts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = [tuple(v) for v in rng.random((30, 2)).round(2)]
    ranks = non_dominated_ranks(values)
    remaining = list(range(len(values)))
    for r in range(max(ranks) + 1):
        front = _brute_front([values[i] for i in remaining])
        assert {remaining[i] for i in front} == {i for i, x in enumerate(ranks) if x == r}
        remaining = [i for i in remaining if ranks[i] != r]


def test_knee_is_the_bend() -> None:
    values = [(0.0, 1.0), (0.05, 0.2), (0.2, 0.15), (0.5, 0.1), (1.0, 0.0)]
    assert knee_index(values) == 1
    assert knee_index([(0.3, 0.3)]) == 0


def test_sparq_front_normalizes_and_keeps_the_reference_stated() -> None:
    pts = [
        FrontPoint("a", 0.97, 10_000),
        FrontPoint("b", 0.96, 5_000),
        FrontPoint("c", 0.95, 9_000),
    ]
    front = sparq_front(pts, baseline_size_bytes=100_000)
    assert [p.trial_id for p in front.points] == ["b", "a"]
    # ref (1, 1) on (size / baseline, 1 - accuracy)
    expected = (1 - 0.05) * (1 - 0.04) + (0.05 - 0.10) * 0 + (1 - 0.10) * (0.04 - 0.03)
    assert front.hypervolume == pytest.approx(expected)
    with pytest.raises(ValueError, match="positive"):
        sparq_front(pts, 0)


def test_choose_respects_constraints_and_says_when_nothing_fits() -> None:
    pts = [
        FrontPoint("big", 0.98, 50_000),
        FrontPoint("mid", 0.975, 20_000),
        FrontPoint("tiny", 0.80, 2_000),
    ]
    kw = {"baseline_accuracy": 0.98, "baseline_size_bytes": 100_000}
    assert choose(pts, rule="min_size", **kw).trial_id == "tiny"  # type: ignore[union-attr]
    limited = choose(pts, rule="min_size", max_accuracy_drop=0.01, **kw)
    assert limited is not None
    assert limited.trial_id == "mid"
    assert choose(pts, rule="max_accuracy", max_size_bytes=30_000, **kw).trial_id == "mid"  # type: ignore[union-attr]
    assert choose(pts, max_accuracy_drop=0.0, max_size_bytes=10_000, **kw) is None


def _random_points(seed: int) -> list[FrontPoint]:
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    # coarse grids so ties in size and in accuracy happen
    return [
        FrontPoint(f"t{i}", rng.randint(50, 100) / 100, rng.randint(1, 40) * 250) for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(30))
def test_rules_match_brute_force(seed: int) -> None:
    pts = _random_points(seed)
    rng = random.Random(1000 + seed)
    cap = rng.randint(0, 40) * 250
    floor = rng.randint(40, 100) / 100
    fits = [p for p in pts if p.size_bytes <= cap]
    got = max_accuracy_under(pts, cap)
    if not fits:
        assert got is None
    else:
        assert got is not None
        assert got.size_bytes <= cap
        assert got.accuracy == max(p.accuracy for p in fits)
        assert got.size_bytes == min(p.size_bytes for p in fits if p.accuracy == got.accuracy)
        # on the front of all points: no point is both smaller-or-equal and more accurate
        assert not any(p.size_bytes <= got.size_bytes and p.accuracy > got.accuracy for p in pts)
    accurate = [p for p in pts if p.accuracy >= floor]
    got = min_size_above(pts, floor)
    if not accurate:
        assert got is None
    else:
        assert got is not None
        assert got.accuracy >= floor
        assert got.size_bytes == min(p.size_bytes for p in accurate)
        assert got.accuracy == max(p.accuracy for p in accurate if p.size_bytes == got.size_bytes)


@pytest.mark.parametrize("seed", range(20))
def test_choose_rules_are_the_rule_functions_on_the_feasible_points(seed: int) -> None:
    pts = _random_points(seed)
    rng = random.Random(2000 + seed)
    kw = {"baseline_accuracy": 1.0, "baseline_size_bytes": 20_000}
    drop = rng.choice([None, 0.1, 0.3])
    cap = rng.choice([None, rng.randint(1, 40) * 250])
    floor = -1.0 if drop is None else 1.0 - drop
    feasible = [
        p for p in pts if p.accuracy >= floor - 1e-12 and (cap is None or p.size_bytes <= cap)
    ]
    got = choose(pts, rule="max_accuracy", max_accuracy_drop=drop, max_size_bytes=cap, **kw)
    want = max(feasible, key=lambda p: (p.accuracy, -p.size_bytes), default=None)
    assert (got is None) == (want is None)
    if got and want:
        assert (got.accuracy, got.size_bytes) == (want.accuracy, want.size_bytes)
    got = choose(pts, rule="min_size", max_accuracy_drop=drop, max_size_bytes=cap, **kw)
    want = min(feasible, key=lambda p: (p.size_bytes, -p.accuracy), default=None)
    assert (got is None) == (want is None)
    if got and want:
        assert (got.accuracy, got.size_bytes) == (want.accuracy, want.size_bytes)
    knee = choose(pts, max_accuracy_drop=drop, max_size_bytes=cap, **kw)
    assert (knee is None) == (not feasible)
    if knee:  # the knee is a feasible point of the front of the feasible points
        assert knee in feasible
        assert knee.trial_id in {p.trial_id for p in sparq_front(feasible, 20_000).points}


@pytest.mark.parametrize("seed", range(15))
def test_hypervolume_history_is_the_hypervolume_of_each_prefix(seed: int) -> None:
    pts = _random_points(seed)
    history = hypervolume_history(pts, 12_000)
    assert len(history) == len(pts)
    for k, hv in enumerate(history):
        values = [(p.size_bytes / 12_000, 1 - p.accuracy) for p in pts[: k + 1]]
        assert hv == pytest.approx(_brute_hv(values, (1.0, 1.0)))
    assert all(b >= a for a, b in itertools.pairwise(history))  # never decreases
    with pytest.raises(ValueError, match="baseline_size_bytes must be positive"):
        hypervolume_history(pts, 0)
