"""The task registry: what each task means for the front, and the spec's check."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from service.spec import OBJECTIVE_MODES, JobSpec
from service.tasks import Task, get_task, task_names

MINIMAL = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}


def test_the_registry_holds_the_tasks_each_defined_once() -> None:
    assert task_names() == ["classification", "distillation", "language_modeling"]
    for name in task_names():
        task = get_task(name)
        assert task.name == name
        assert get_task(task) is task  # a task is taken as it is
        assert task.objective in OBJECTIVE_MODES  # an objective the search knows
        assert task.objective in task.reports  # trials report what the search optimizes
        assert {"accuracy", "loss"} <= set(task.reports)
        assert task.quality_label
        assert task.constraint_unit


def test_classification_ranks_by_accuracy_and_language_modelling_by_likelihood() -> None:
    metrics = {"accuracy": 0.7, "loss": 2.0}
    assert get_task("classification").quality(metrics) == 0.7
    assert get_task("language_modeling").quality(metrics) == pytest.approx(math.exp(-2.0))
    # a missing metric is the worst quality, never an error; a huge loss does not overflow
    assert get_task("classification").quality({"loss": 0.1}) == 0.0
    assert get_task("language_modeling").quality({"accuracy": 0.9}) == 0.0
    assert get_task("language_modeling").quality({"loss": 1e6}) == pytest.approx(0.0)


def test_an_unknown_task_is_refused_naming_the_tasks() -> None:
    with pytest.raises(
        ValueError,
        match="unknown task 'regression': the tasks are classification, distillation, "
        "language_modeling",
    ):
        get_task("regression")
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**MINIMAL, "task": "regression"})
    [err] = e.value.errors()
    assert err["loc"] == ("task",)
    assert "classification, distillation, language_modeling" in err["msg"]


def test_a_task_sets_the_default_objectives_and_is_listed_in_the_schema() -> None:
    trained = {"builtin": "digits-mlp", "pretrained": True}  # distillation's teacher
    for name in task_names():
        spec = JobSpec.model_validate({**MINIMAL, "model": trained, "task": name})
        assert spec.objectives == [get_task(name).objective, "size_bytes"]
    assert JobSpec.model_json_schema()["properties"]["task"]["enum"] == task_names()


def test_a_task_is_registered_by_subclassing_and_only_once() -> None:
    with pytest.raises(ValueError, match="defined twice"):

        class Again(Task):
            name = "classification"
