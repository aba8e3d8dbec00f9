"""Non-dominated sorting, 2-D hypervolume and the knee point.

Every function takes objective vectors to *minimize*. sparq's two objectives map
to ``(size_bytes / baseline_size_bytes, 1 - quality)`` (quality: the task's axis,
``service/tasks.py``; accuracy for classification), so both lie in [0, 1] for any
useful point and the hypervolume reference point is ``(1, 1)``: zero quality at the
float model's size. That mapping is :func:`minimized` alone, the reference
:data:`HV_REFERENCE`; ``dashboards/_front.py`` maps trials to points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

Vector = Sequence[float]
HV_REFERENCE: tuple[float, float] = (1.0, 1.0)  # (size / baseline size, 1 - quality)


def _dominates(a: Vector, b: Vector) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def non_dominated_ranks(values: Sequence[Vector]) -> list[int]:
    """Rank 0 for the Pareto front, 1 for the front once rank 0 is removed, and so on.

    Simple O(n^2) per layer sort: searches here hold hundreds of trials, not millions.
    Duplicate points share a rank.
    """
    n = len(values)
    ranks = [-1] * n
    remaining = set(range(n))
    rank = 0
    while remaining:
        layer = [
            i for i in remaining if not any(_dominates(values[j], values[i]) for j in remaining)
        ]
        for i in layer:
            ranks[i] = rank
        remaining -= set(layer)
        rank += 1
    return ranks


def pareto_indices(values: Sequence[Vector]) -> list[int]:
    """Indices of the non-dominated points, sorted by the first objective."""
    ranks = non_dominated_ranks(values)
    front = [i for i, r in enumerate(ranks) if r == 0]
    return sorted(front, key=lambda i: tuple(values[i]))


def hypervolume_2d(values: Sequence[Vector], ref: tuple[float, float]) -> float:
    """Area dominated by the points and bounded by ``ref`` (both objectives minimized).

    Points not strictly better than ``ref`` in both objectives add nothing.
    """
    pts = sorted((float(a), float(b)) for a, b in values if a < ref[0] and b < ref[1])
    area, best_b = 0.0, ref[1]
    for a, b in pts:  # sweep along the first objective
        if b < best_b:
            area += (ref[0] - a) * (best_b - b)
            best_b = b
    return area


def knee_index(values: Sequence[Vector]) -> int:
    """Index (into ``values``) of the knee of a 2-D front.

    Objectives are normalized to [0, 1] over the given points; the knee is the point
    farthest from the straight line joining the two extremes. With fewer than three
    distinct points there is no bend, and the point nearest the ideal corner wins.
    """
    if not values:
        raise ValueError("the knee of an empty front is undefined")
    lo = [min(v[k] for v in values) for k in range(2)]
    span = [max(v[k] for v in values) - lo[k] or 1.0 for k in range(2)]
    norm = [((v[0] - lo[0]) / span[0], (v[1] - lo[1]) / span[1]) for v in values]
    a = min(range(len(norm)), key=lambda i: norm[i])  # best in objective 0
    b = min(range(len(norm)), key=lambda i: (norm[i][1], norm[i][0]))  # best in objective 1
    if len({norm[i] for i in range(len(norm))}) < 3 or a == b:
        return min(range(len(norm)), key=lambda i: math.hypot(*norm[i]))
    (x1, y1), (x2, y2) = norm[a], norm[b]
    length = math.hypot(x2 - x1, y2 - y1)

    def distance(i: int) -> float:
        x, y = norm[i]
        # signed: positive on the side of the ideal corner (0, 0)
        return ((x2 - x1) * (y1 - y) - (x1 - x) * (y2 - y1)) / length

    return max(range(len(norm)), key=distance)


class FrontPoint(NamedTuple):
    """One trial as the front math sees it. ``accuracy`` is the task's quality axis
    (accuracy for classification, exp(-loss) for language modelling)."""

    trial_id: str
    accuracy: float
    size_bytes: int


class SparqFront(NamedTuple):
    points: list[FrontPoint]  # the non-dominated trials, smallest first
    hypervolume: float  # of (size / baseline_size, 1 - quality), reference HV_REFERENCE


def minimized(quality: float, size_bytes: int, baseline_size_bytes: int) -> tuple[float, float]:
    """A point's two objectives, both minimized: relative size and 1 - quality."""
    return (size_bytes / baseline_size_bytes, 1.0 - quality)


def _minimize(p: FrontPoint, baseline_size: int) -> tuple[float, float]:
    return minimized(p.accuracy, p.size_bytes, baseline_size)


def sparq_front(points: Sequence[FrontPoint], baseline_size_bytes: int) -> SparqFront:
    """The accuracy/size front of a job and its normalized hypervolume."""
    if baseline_size_bytes <= 0:
        raise ValueError(f"baseline_size_bytes must be positive, but got {baseline_size_bytes}")
    values = [_minimize(p, baseline_size_bytes) for p in points]
    idx = pareto_indices(values)
    return SparqFront(
        points=[points[i] for i in idx], hypervolume=hypervolume_2d(values, ref=HV_REFERENCE)
    )


def hypervolume_history(points: Sequence[FrontPoint], baseline_size_bytes: int) -> list[float]:
    """Hypervolume after each point, in the given (finishing) order: entry ``k`` is
    the :func:`sparq_front` hypervolume of ``points[: k + 1]``."""
    if baseline_size_bytes <= 0:
        raise ValueError(f"baseline_size_bytes must be positive, but got {baseline_size_bytes}")
    values: list[tuple[float, float]] = []
    out = []
    for p in points:
        values.append(_minimize(p, baseline_size_bytes))
        out.append(hypervolume_2d(values, ref=HV_REFERENCE))
    return out


def max_accuracy_under(points: Sequence[FrontPoint], max_size_bytes: int) -> FrontPoint | None:
    """The most accurate point of at most ``max_size_bytes`` (ties: the smaller one).

    The answer is always on the front: a point dominating it would be at least as
    small and more accurate. None when every point is too big.
    """
    fits = [p for p in points if p.size_bytes <= max_size_bytes]
    return max(fits, key=lambda p: (p.accuracy, -p.size_bytes, p.trial_id), default=None)


def min_size_above(points: Sequence[FrontPoint], min_accuracy: float) -> FrontPoint | None:
    """The smallest point with accuracy of at least ``min_accuracy`` (ties: the more
    accurate one). None when no point is accurate enough."""
    fits = [p for p in points if p.accuracy >= min_accuracy - 1e-12]
    return min(fits, key=lambda p: (p.size_bytes, -p.accuracy, p.trial_id), default=None)


Rule = Literal["knee", "max_accuracy", "min_size"]


def choose(
    points: Sequence[FrontPoint],
    *,
    baseline_accuracy: float,
    baseline_size_bytes: int,
    rule: Rule = "knee",
    max_accuracy_drop: float | None = None,
    max_size_bytes: int | None = None,
) -> FrontPoint | None:
    """The point to export: ``rule`` applied to the front of the feasible points.

    Returns None when no point meets the constraints; callers say so rather than
    silently exporting an infeasible point.
    """
    floor = -math.inf if max_accuracy_drop is None else baseline_accuracy - max_accuracy_drop
    cap = (
        max_size_bytes
        if max_size_bytes is not None
        else max((p.size_bytes for p in points), default=0)
    )
    if rule == "max_accuracy":
        return max_accuracy_under([p for p in points if p.accuracy >= floor - 1e-12], cap)
    if rule == "min_size":
        return min_size_above([p for p in points if p.size_bytes <= cap], floor)
    feasible = [p for p in points if p.accuracy >= floor - 1e-12 and p.size_bytes <= cap]
    if not feasible:
        return None
    front = sparq_front(feasible, baseline_size_bytes).points
    return front[knee_index([_minimize(p, baseline_size_bytes) for p in front])]
