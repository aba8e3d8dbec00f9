"""Pareto front math as pure functions (no torch, no ray): one implementation used
by the API, the driver, the exports and the plots. The plot renderers import
matplotlib/plotly only when called."""

from dashboards._pareto import (
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
from dashboards._plots import (
    FRONT_RGB,
    FrontPlot,
    HypervolumePlot,
    PlotPoint,
    PolicyPlot,
    front_plot,
    hypervolume_plot,
    policy_lines,
    policy_plot,
    render_front_html,
    render_front_png,
    render_hypervolume_png,
    render_policy_png,
    render_views,
)

__all__ = [
    "FRONT_RGB",
    "FrontPlot",
    "FrontPoint",
    "HypervolumePlot",
    "PlotPoint",
    "PolicyPlot",
    "choose",
    "front_plot",
    "hypervolume_2d",
    "hypervolume_history",
    "hypervolume_plot",
    "knee_index",
    "max_accuracy_under",
    "min_size_above",
    "non_dominated_ranks",
    "pareto_indices",
    "policy_lines",
    "policy_plot",
    "render_front_html",
    "render_front_png",
    "render_hypervolume_png",
    "render_policy_png",
    "render_views",
    "sparq_front",
]
