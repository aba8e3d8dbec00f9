"""The tasks a job can be (``JobSpec.task``), and what each one means for the search.

A task decides which objective the search optimizes next to size, which metrics a
trial reports, how the Pareto front's quality axis is computed from those metrics
(and how plots and records name it), and so what ``constraints.max_accuracy_drop``
is a drop of. Everything that ranks trials (the front, the export choice, the live
views, the CLI's pick, the sampler's constraints, early stopping) goes through
:func:`get_task`, so a task means the same thing everywhere.

This is the task's pure part: the service, ``dashboards`` and the search import it
without torch. Its torch part (the training loss and the evaluation metrics) is in
``workers/compress/train.py``. A task registers itself by subclassing :class:`Task`: there
is no list of tasks to keep in step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

_TASKS: dict[str, Task] = {}


class Task:
    """One task. Subclasses set the class attributes and :meth:`quality`; defining a
    subclass registers an instance under its ``name``."""

    name: ClassVar[str]
    objective: ClassVar[str]  # the spec's quality objective (OBJECTIVE_MODES key)
    quality_label: ClassVar[str]  # the front's quality axis, as plots and records name it
    accuracy_label: ClassVar[str] = "accuracy"  # what the stored `accuracy` column holds
    constraint_unit: ClassVar[str]  # what constraints.max_accuracy_drop is a drop of
    reports: ClassVar[tuple[str, ...]]  # an evaluation's metrics in every trial result
    # the loops compare the model with the float model (the teacher), not with labels
    needs_teacher: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.name in _TASKS:
            raise ValueError(f"task {cls.name!r} is defined twice")
        _TASKS[cls.name] = cls()

    def quality(self, metrics: Mapping[str, Any]) -> float:
        """The front's quality axis (maximized, in [0, 1]) from a trial's (or the
        baseline's) ``accuracy`` and ``loss``; a missing metric counts as worst."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class Classification(Task):
    """Top-1 accuracy is the quality: the objective trials are ranked by."""

    name = "classification"
    objective = "accuracy"
    quality_label = "accuracy"
    constraint_unit = "accuracy (a fraction: 0.01 = one point)"
    reports = ("accuracy", "loss")

    def quality(self, metrics: Mapping[str, Any]) -> float:
        return float(metrics.get("accuracy") or 0.0)


class Distillation(Task):
    """The float model is the teacher: a trial fine-tunes the compressed student to
    give the teacher's outputs on (unlabelled) inputs, and its quality is how close it
    stays on held-out inputs: the mean cosine similarity of the (mean-pooled)
    embeddings, or the top-1 agreement for logits (``distillation.loss: kl``). The
    evaluation writes that quality into ``accuracy`` (the store's column), and the
    cosine under its own name too. The float model itself scores 1."""

    name = "distillation"
    objective = "cosine"
    quality_label = "similarity to the float model (cosine; agreement for logits)"
    accuracy_label = "cosine"  # (agreement for logits)
    constraint_unit = "cosine similarity to the float model (0.01 = 0.01 of cosine)"
    reports = ("cosine", "accuracy", "loss")
    needs_teacher = True

    def quality(self, metrics: Mapping[str, Any]) -> float:
        return float(metrics.get("accuracy") or 0.0)


class LanguageModeling(Task):
    """The objective is perplexity, so the quality is ``1 / perplexity = exp(-loss)``
    (the mean per-token likelihood, in [0, 1]), not per-token top-1 accuracy: a model
    can guess the top token as often and still be far less sure of the text."""

    name = "language_modeling"
    objective = "perplexity"
    quality_label = "exp(-loss) (per-token likelihood)"
    accuracy_label = "token accuracy"
    constraint_unit = "exp(-loss) = 1 / perplexity (0.01 = one point of per-token likelihood)"
    reports = ("accuracy", "loss", "perplexity")

    def quality(self, metrics: Mapping[str, Any]) -> float:
        loss = metrics.get("loss")
        return math.exp(-min(float(loss), 700.0)) if loss is not None else 0.0


def task_names() -> list[str]:
    """Every registered task's name, sorted."""
    return sorted(_TASKS)


def get_task(task: str | Task) -> Task:
    """The task named ``task`` (a :class:`Task` is returned as it is); a ValueError
    naming the known tasks otherwise."""
    if isinstance(task, Task):
        return task
    try:
        return _TASKS[task]
    except KeyError:
        raise ValueError(
            f"unknown task {task!r}: the tasks are {', '.join(task_names())}"
        ) from None
