"""A job's front as every consumer sees it: trials (their metrics and size) mapped to
front points through the task's quality axis (``service/tasks.py``), the front and
its hypervolume, the reference point described, and the point the export rule picks.

The REST ``pareto`` view, the driver's progress callback and export, the live views,
the CLI's current pick, the sampler's constraints and early stopping all call these,
so for a language-modelling job they rank by the same ``exp(-loss)`` and never by
token accuracy in one place and likelihood in another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from dashboards._pareto import HV_REFERENCE, FrontPoint, Rule, SparqFront, choose, sparq_front
from service.tasks import Task, get_task


class Measured(Protocol):
    """A trial as recorded (``service.store.Trial``): what the front needs of it."""

    @property
    def trial_id(self) -> str: ...
    @property
    def accuracy(self) -> float | None: ...
    @property
    def loss(self) -> float | None: ...
    @property
    def size_bytes(self) -> int | None: ...


Record = Measured | Mapping[str, Any]  # a stored trial, or a result / REST point as a dict


def _metrics(t: Record) -> Mapping[str, Any]:
    if isinstance(t, Mapping):
        return t
    return {"accuracy": t.accuracy, "loss": t.loss, "size_bytes": t.size_bytes}


def quality(task: str | Task, metrics: Record) -> float:
    """The front's quality of a trial, a result or the baseline (``accuracy``/``loss``)."""
    return get_task(task).quality(_metrics(metrics))


def baseline_quality(task: str | Task, result: Mapping[str, Any]) -> float | None:
    """The float baseline's quality from what a trial reports of it (``baseline_accuracy``,
    ``baseline_loss``); None until a trial has reported it."""
    if result.get("baseline_accuracy") is None:
        return None
    base = {"accuracy": result["baseline_accuracy"], "loss": result.get("baseline_loss")}
    return quality(task, base)


def front_point(task: str | Task, t: Record) -> FrontPoint:
    """One trial as a front point: its id, its quality, its checkpoint's size."""
    m = _metrics(t)
    trial_id = t["trial_id"] if isinstance(t, Mapping) else t.trial_id
    return FrontPoint(str(trial_id), quality(task, m), int(m.get("size_bytes") or 0))


def front_points(task: str | Task, trials: Iterable[Record]) -> list[FrontPoint]:
    return [front_point(task, t) for t in trials]


def job_front(task: str | Task, trials: Iterable[Record], baseline_size_bytes: int) -> SparqFront:
    """The front of the completed ``trials`` and its normalized hypervolume."""
    return sparq_front(front_points(task, trials), baseline_size_bytes)


def hypervolume_reference(task: str | Task) -> dict[str, Any]:
    """What the hypervolume is of, for records (``pareto/front.json``): the objectives
    named with the task's quality label, and the one reference point."""
    label = get_task(task).quality_label
    return {
        "objectives": ["size_bytes / baseline size_bytes", f"1 - {label}"],
        "minimized": True,
        "point": list(HV_REFERENCE),
    }


def hypervolume_reference_text(task: str | Task) -> str:
    """:func:`hypervolume_reference` in words (the REST ``pareto`` view)."""
    ref = hypervolume_reference(task)
    a, b = ref["objectives"]
    x, y = ref["point"]
    return f"objectives ({a}, {b}), both minimized; reference point ({x:g}, {y:g})"


def export_choice(
    task: str | Task,
    trials: Iterable[Record],
    *,
    baseline: Record,
    baseline_size_bytes: int,
    rule: Rule = "knee",
    max_accuracy_drop: float | None = None,
    max_size_bytes: int | None = None,
) -> FrontPoint | None:
    """The point the export takes (or would take now) of the completed ``trials``:
    ``rule`` on the feasible front, with ``max_accuracy_drop`` measured on the task's
    quality axis below the ``baseline``'s (its ``accuracy``/``loss``)."""
    return choose(
        front_points(task, trials),
        baseline_accuracy=quality(task, baseline),
        baseline_size_bytes=baseline_size_bytes,
        rule=rule,
        max_accuracy_drop=max_accuracy_drop,
        max_size_bytes=max_size_bytes,
    )


def quality_drop_constraint(
    task: str | Task, result: Mapping[str, Any], baseline: float, max_drop: float
) -> float:
    """How far ``result`` is below the allowed quality (<= 0 when it meets it): the
    sampler's constraint, on the same axis as :func:`export_choice`'s floor."""
    return baseline - quality(task, result) - max_drop
