"""Pareto front math as pure functions (no torch, no ray): one implementation used
by the API, the driver, the exports and the plots."""

from dashboards._pareto import (
    FrontPoint,
    choose,
    hypervolume_2d,
    knee_index,
    non_dominated_ranks,
    pareto_indices,
    sparq_front,
)

__all__ = [
    "FrontPoint",
    "choose",
    "hypervolume_2d",
    "knee_index",
    "non_dominated_ranks",
    "pareto_indices",
    "sparq_front",
]
