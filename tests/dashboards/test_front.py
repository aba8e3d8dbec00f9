"""The job's front through the task's quality axis (dashboards/_front.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from dashboards import (
    HV_REFERENCE,
    FrontPoint,
    baseline_quality,
    export_choice,
    front_point,
    hypervolume_reference,
    hypervolume_reference_text,
    job_front,
    quality,
    quality_drop_constraint,
    sparq_front,
)


@dataclass
class Trial:  # the fields of service.store.Trial the front reads
    trial_id: str
    accuracy: float | None
    loss: float | None
    size_bytes: int | None


TRIALS = [Trial("a", 0.9, 2.0, 100), Trial("b", 0.8, 1.0, 100), Trial("c", 0.5, 0.5, 400)]


def test_a_stored_trial_and_a_dict_map_to_the_same_point() -> None:
    t = TRIALS[0]
    as_dict = {"trial_id": "a", "accuracy": 0.9, "loss": 2.0, "size_bytes": 100}
    for task, q in [("classification", 0.9), ("language_modeling", math.exp(-2.0))]:
        assert front_point(task, t) == front_point(task, as_dict) == FrontPoint("a", q, 100)
        assert quality(task, t) == pytest.approx(q)


def test_the_front_follows_the_task() -> None:
    cls = job_front("classification", TRIALS, 1000)
    lm = job_front("language_modeling", TRIALS, 1000)
    assert [p.trial_id for p in cls.points] == ["a"]  # c is bigger and less accurate
    assert [p.trial_id for p in lm.points] == ["b", "c"]  # b: lower loss at a's size
    points = [FrontPoint("b", math.exp(-1.0), 100), FrontPoint("c", math.exp(-0.5), 400)]
    assert lm.hypervolume == pytest.approx(sparq_front(points, 1000).hypervolume)


def test_the_reference_is_one_point_named_by_the_task() -> None:
    assert HV_REFERENCE == (1.0, 1.0)
    assert hypervolume_reference("classification") == {
        "objectives": ["size_bytes / baseline size_bytes", "1 - accuracy"],
        "minimized": True,
        "point": [1.0, 1.0],
    }
    assert hypervolume_reference("language_modeling")["objectives"][1] == (
        "1 - exp(-loss) (per-token likelihood)"
    )
    assert hypervolume_reference_text("classification") == (
        "objectives (size_bytes / baseline size_bytes, 1 - accuracy), both minimized; "
        "reference point (1, 1)"
    )


def test_the_export_choice_and_the_constraint_share_the_floor() -> None:
    baseline = {"accuracy": 0.9, "loss": 0.9}  # LM quality exp(-0.9) = 0.407
    # a drop of 0.05: exp(-loss) >= 0.357, loss <= 1.03: b (loss 1.0) and c qualify
    best = export_choice(
        "language_modeling",
        TRIALS,
        baseline=baseline,
        baseline_size_bytes=1000,
        rule="min_size",
        max_accuracy_drop=0.05,
    )
    assert best is not None
    assert best.trial_id == "b"
    base = quality("language_modeling", baseline)
    drops = {
        t.trial_id: quality_drop_constraint("language_modeling", {"loss": t.loss}, base, 0.05)
        for t in TRIALS
    }
    assert {t for t, v in drops.items() if v <= 0} == {"b", "c"}
    # classification: accuracy's unit; a is the smallest within 0.05 of 0.9
    best = export_choice(
        "classification",
        TRIALS,
        baseline=baseline,
        baseline_size_bytes=1000,
        rule="min_size",
        max_accuracy_drop=0.05,
    )
    assert best is not None
    assert best.trial_id == "a"


def test_the_baseline_quality_comes_from_what_a_trial_reports() -> None:
    report = {"baseline_accuracy": 0.6, "baseline_loss": 1.0}
    assert baseline_quality("classification", report) == 0.6
    assert baseline_quality("language_modeling", report) == pytest.approx(math.exp(-1.0))
    assert baseline_quality("language_modeling", {"accuracy": 0.5}) is None  # not yet known
