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
    knee_index,
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
