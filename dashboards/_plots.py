"""Plots of a job's search: the accuracy/size front, hypervolume against trials, and
the per-layer policy of the chosen point.

As in Optuna's ``visualization`` package, a pure function computes each plot's data
(a NamedTuple, tested directly) and a thin function renders it. The front itself is
always :func:`dashboards.sparq_front`; nothing here re-implements the math.
matplotlib and plotly are imported by the renderers only, so ``dashboards`` stays
cheap to import for the service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dashboards._pareto import FrontPoint, hypervolume_history, sparq_front

# Colours are part of the contract with the browser test, which looks for FRONT_RGB
# pixels in a screenshot of the MLflow UI.
FRONT_COLOR = "#ff7f0e"
FRONT_RGB = (0xFF, 0x7F, 0x0E)
TRIAL_COLOR = "#9e9e9e"
BASELINE_COLOR = "#1f77b4"
CHOSEN_COLOR = "#d62728"


class PlotPoint(NamedTuple):
    """A completed trial as the plots see it: its measurements and full policy
    (``accuracy``: the front's quality axis, exp(-loss) for a language model)."""

    trial_id: str
    accuracy: float
    size_bytes: int
    policy: Mapping[str, Any]


class FrontPlot(NamedTuple):
    trials: list[PlotPoint]  # every completed trial
    front: list[PlotPoint]  # the non-dominated ones, smallest first
    baseline_accuracy: float
    baseline_size_bytes: int
    chosen: PlotPoint | None
    hypervolume: float
    title: str
    quality_label: str = "accuracy"  # the y axis: the task's quality (service/tasks.py)


class HypervolumePlot(NamedTuple):
    steps: list[int]  # finished trials (completed or failed) so far
    values: list[float]  # hypervolume of the completed ones at that step
    title: str


class PolicyPlot(NamedTuple):
    trial_id: str
    layers: list[str]
    bits: list[int]
    sparsity: list[float]
    extra: dict[str, Any]  # policy-wide knobs (noise rate, ...)
    title: str


def policy_lines(policy: Mapping[str, Any]) -> list[str]:
    """One line per layer (every knob it has) then the policy-wide knobs, for hovers
    and captions. Unknown knobs are shown as they are, so new methods need no change."""
    lines = []
    for name, lp in (policy.get("layers") or {}).items():
        knobs = ", ".join(
            f"{k} {_fmt(v, pct=k == 'sparsity')}" for k, v in sorted(lp.items(), key=_knob_order)
        )
        lines.append(f"{name}: {knobs}")
    rest = {k: v for k, v in policy.items() if k != "layers"}
    if rest:
        lines.append(", ".join(f"{k} {_fmt(v)}" for k, v in sorted(rest.items())))
    return lines


def _knob_order(kv: tuple[str, Any]) -> tuple[int, str]:
    return ({"bits": 0, "sparsity": 1}.get(kv[0], 2), kv[0])


def _fmt(v: Any, pct: bool = False) -> str:
    if pct and isinstance(v, int | float):
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def front_plot(
    points: Sequence[PlotPoint],
    *,
    baseline_accuracy: float,
    baseline_size_bytes: int,
    chosen_trial_id: str | None = None,
    title: str = "",
    quality_label: str = "accuracy",
) -> FrontPlot:
    """The data of the front plot; ``points`` are the completed trials."""
    by_id = {p.trial_id: p for p in points}
    front = sparq_front(
        [FrontPoint(p.trial_id, p.accuracy, p.size_bytes) for p in points], baseline_size_bytes
    )
    if chosen_trial_id is not None and chosen_trial_id not in by_id:
        raise ValueError(
            f"chosen_trial_id={chosen_trial_id!r} is not among the {len(points)} plotted trials"
        )
    return FrontPlot(
        trials=list(points),
        front=[by_id[p.trial_id] for p in front.points],
        baseline_accuracy=baseline_accuracy,
        baseline_size_bytes=baseline_size_bytes,
        chosen=by_id[chosen_trial_id] if chosen_trial_id else None,
        hypervolume=front.hypervolume,
        title=title,
        quality_label=quality_label,
    )


def hypervolume_plot(
    finished: Sequence[PlotPoint | None], *, baseline_size_bytes: int, title: str = ""
) -> HypervolumePlot:
    """Hypervolume after each finished trial, in finishing order (None: a failed trial,
    which counts as a step and leaves the hypervolume as it was)."""
    done = [p for p in finished if p is not None]
    hv = hypervolume_history(
        [FrontPoint(p.trial_id, p.accuracy, p.size_bytes) for p in done], baseline_size_bytes
    )
    steps, values, k, current = [], [], 0, 0.0
    for i, p in enumerate(finished, start=1):
        if p is not None:
            current, k = hv[k], k + 1
        steps.append(i)
        values.append(current)
    return HypervolumePlot(steps=steps, values=values, title=title)


def policy_plot(point: PlotPoint, title: str = "") -> PolicyPlot:
    """Bits and sparsity per layer of one trial's policy, in the model's layer order."""
    layers = dict(point.policy.get("layers") or {})
    if not layers:
        raise ValueError(f"trial {point.trial_id} has no per-layer policy to plot")
    return PolicyPlot(
        trial_id=point.trial_id,
        layers=list(layers),
        bits=[int(lp["bits"]) for lp in layers.values()],
        sparsity=[float(lp.get("sparsity", 0.0)) for lp in layers.values()],
        extra={k: v for k, v in point.policy.items() if k != "layers"},
        title=title,
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: rendering happens in drivers and servers
    import matplotlib.pyplot as plt

    return plt


def render_front_png(data: FrontPlot, path: str | Path, dpi: int = 110) -> Path:
    """The front as a PNG: trials grey, front orange (a staircase), baseline and chosen
    point marked; size on a log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        ax.scatter(
            [p.size_bytes for p in data.trials],
            [p.accuracy for p in data.trials],
            s=22,
            c=TRIAL_COLOR,
            alpha=0.7,
            label=f"trials ({len(data.trials)})",
        )
        ax.step(
            [p.size_bytes for p in data.front],
            [p.accuracy for p in data.front],
            where="post",
            color=FRONT_COLOR,
            linewidth=2.5,
            marker="o",
            markersize=7,
            label=f"Pareto front ({len(data.front)})",
        )
        ax.scatter(
            [data.baseline_size_bytes],
            [data.baseline_accuracy],
            marker="*",
            s=260,
            c=BASELINE_COLOR,
            zorder=5,
            label=f"float baseline ({data.baseline_size_bytes:,} B)",
        )
        if data.chosen is not None:
            c = data.chosen
            ax.scatter(
                [c.size_bytes],
                [c.accuracy],
                s=320,
                facecolors="none",
                edgecolors=CHOSEN_COLOR,
                linewidths=2.5,
                zorder=6,
                label=f"chosen {c.trial_id}: {c.accuracy:.4f}, {c.size_bytes:,} B",
            )
        ax.set_xscale("log")
        ax.set_xlabel("checkpoint size (bytes, log scale)")
        ax.set_ylabel(f"validation {data.quality_label}")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(data.title or f"{data.quality_label} vs size", fontsize=11)
        axis = "acc" if data.quality_label == "accuracy" else "quality"
        ax.text(
            0.99,
            0.02,
            f"hypervolume {data.hypervolume:.4f}\nref (1, 1) on (size / baseline, 1 - {axis})",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="#555555",
        )
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return out


def render_front_html(data: FrontPlot, path: str | Path) -> Path:
    """The front as one self-contained HTML page (plotly.js embedded, no network):
    hovering a point shows its measurements and full per-layer policy."""
    import plotly.graph_objects as go

    def hover(p: PlotPoint) -> str:
        head = (
            f"<b>{p.trial_id}</b><br>{data.quality_label} {p.accuracy:.4f} "
            f"({p.accuracy - data.baseline_accuracy:+.4f} vs float)<br>"
            f"{p.size_bytes:,} bytes ({data.baseline_size_bytes / p.size_bytes:.1f}x smaller)"
        )
        return "<br>".join([head, *policy_lines(p.policy)])

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[p.size_bytes for p in data.trials],
            y=[p.accuracy for p in data.trials],
            mode="markers",
            name=f"trials ({len(data.trials)})",
            marker={"color": TRIAL_COLOR, "size": 8, "opacity": 0.7},
            hovertext=[hover(p) for p in data.trials],
            hoverinfo="text",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[p.size_bytes for p in data.front],
            y=[p.accuracy for p in data.front],
            mode="lines+markers",
            line={"color": FRONT_COLOR, "width": 3, "shape": "hv"},
            marker={"color": FRONT_COLOR, "size": 11},
            name=f"Pareto front ({len(data.front)})",
            hovertext=[hover(p) for p in data.front],
            hoverinfo="text",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[data.baseline_size_bytes],
            y=[data.baseline_accuracy],
            mode="markers",
            marker={"symbol": "star", "size": 18, "color": BASELINE_COLOR},
            name="float baseline",
            hovertext=[
                f"<b>float baseline</b><br>{data.quality_label} {data.baseline_accuracy:.4f}<br>"
                f"{data.baseline_size_bytes:,} bytes"
            ],
            hoverinfo="text",
        )
    )
    if data.chosen is not None:
        fig.add_trace(
            go.Scatter(
                x=[data.chosen.size_bytes],
                y=[data.chosen.accuracy],
                mode="markers",
                marker={
                    "symbol": "circle-open",
                    "size": 22,
                    "color": CHOSEN_COLOR,
                    "line": {"width": 3},
                },
                name=f"chosen ({data.chosen.trial_id})",
                hovertext=[hover(data.chosen)],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title=f"{data.title or data.quality_label + ' vs size'} · hypervolume "
        f"{data.hypervolume:.4f}",
        xaxis={"title": "checkpoint size (bytes)", "type": "log"},
        yaxis={"title": f"validation {data.quality_label}"},
        template="plotly_white",
        hoverlabel={"align": "left"},
    )
    out = Path(path)
    fig.write_html(str(out), include_plotlyjs=True, full_html=True)
    return out


def render_hypervolume_png(data: HypervolumePlot, path: str | Path, dpi: int = 110) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    try:
        ax.step(data.steps, data.values, where="post", color=FRONT_COLOR, linewidth=2)
        ax.plot(data.steps, data.values, "o", color=FRONT_COLOR, markersize=3)
        ax.set_xlabel("finished trials")
        ax.set_ylabel("hypervolume")
        ax.grid(True, alpha=0.3)
        ax.set_title(data.title or "hypervolume vs trials", fontsize=11)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return out


def render_policy_png(data: PolicyPlot, path: str | Path, dpi: int = 110) -> Path:
    """Weight bits (bars) and sparsity (bars, second panel) of each layer."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 4.6), sharex=True)
    try:
        xs = list(range(len(data.layers)))
        ax1.bar(xs, data.bits, color=BASELINE_COLOR)
        for x, b in zip(xs, data.bits, strict=True):
            ax1.text(x, b, str(b), ha="center", va="bottom", fontsize=8)
        ax1.set_ylabel("weight bits")
        ax1.set_ylim(0, max(8, *data.bits) * 1.15)
        ax2.bar(xs, [100 * s for s in data.sparsity], color=FRONT_COLOR)
        ax2.set_ylabel("sparsity (%)")
        ax2.set_ylim(0, 100)
        ax2.set_xticks(xs, data.layers, rotation=30 if len(xs) > 6 else 0, fontsize=8)
        ax2.set_xlabel("layer")
        extra = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(data.extra.items()))
        ax1.set_title(
            (data.title or f"policy of {data.trial_id}") + (f"\n{extra}" if extra else ""),
            fontsize=10,
        )
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return out


def render_views(front: FrontPlot, hv: HypervolumePlot | None, out_dir: str | Path) -> list[Path]:
    """Every view of a job into ``out_dir``: front.png, front.html, hypervolume.png and,
    when a point is chosen, policy.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        render_front_png(front, out / "front.png"),
        render_front_html(front, out / "front.html"),
    ]
    if hv is not None and hv.steps:
        paths.append(render_hypervolume_png(hv, out / "hypervolume.png"))
    if front.chosen is not None and front.chosen.policy.get("layers"):
        paths.append(
            render_policy_png(
                policy_plot(
                    front.chosen, title=f"policy of the chosen point {front.chosen.trial_id}"
                ),
                out / "policy.png",
            )
        )
    return paths
