"""The terminal views of `sparq status` / `sparq watch`, rendered to text."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from service.views import current_choice, front_table, job_view


def _job(**kw: Any) -> dict[str, Any]:
    job = {
        "id": "j1",
        "status": "running",
        "trials_total": 10,
        "trials_completed": 3,
        "trials_failed": 1,
        "trials_stopped": 2,
        "front_size": 2,
        "hypervolume": 0.8123,
        "started_at": "2026-01-01T00:00:00",
        "finished_at": "2026-01-01T00:01:05",
        "spec": {"export": {"choose": "min_size"}, "constraints": {"max_accuracy_drop": 0.02}},
        "message": None,
        "error": None,
    }
    return {**job, **kw}


def _pareto(chosen: str | None = None) -> dict[str, Any]:
    pol = {"layers": {"1": {"bits": 4, "sparsity": 0.5}, "3": {"bits": 2, "sparsity": 0.1}}}
    return {
        "baseline": {"accuracy": 0.95, "size_bytes": 40_000},
        "hypervolume": 0.8123,
        "chosen_trial_id": chosen,
        "points": [
            {
                "trial_id": "a",
                "accuracy": 0.90,
                "size_bytes": 3_000,
                "compression": 13.3,
                "policy": pol,
            },
            {
                "trial_id": "b",
                "accuracy": 0.94,
                "size_bytes": 5_000,
                "compression": 8.0,
                "policy": pol,
            },
        ],
    }


def _text(renderable: Any) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_the_rule_pick_is_marked_while_running_and_the_export_after() -> None:
    # min_size within 0.02 of 0.95: "a" (0.90) is too inaccurate, "b" is the pick
    assert current_choice(_job(), _pareto()) == "b"
    assert current_choice(_job(), _pareto(chosen="a")) == "a"
    assert current_choice(_job(spec={}), _pareto()) in {"a", "b"}  # knee by default
    text = _text(front_table(_pareto(), "b"))
    assert "b *" in text
    assert "a *" not in text
    assert "the rule's pick now" in text
    assert "2,4" in text  # the bit widths in use


def test_job_view_shows_progress_front_and_errors() -> None:
    text = _text(job_view(_job(), _pareto()))
    assert "6/10" in text  # completed + failed + stopped of total
    assert "[running]" in text
    assert "(1 failed)" in text
    assert "(2 stopped early)" in text
    assert "hv 0.8123" in text
    assert "0:01:05" in text
    assert "Pareto front (2 points, hypervolume 0.8123)" in text
    waiting = _text(job_view(_job(trials_completed=0, trials_failed=0, trials_stopped=0), None))
    assert "waiting for the first trial" in waiting
    failed = _text(job_view(_job(status="failed", error="boom"), None))
    assert "error: boom" in failed


def test_a_distillation_front_shows_its_cosine_once_and_an_lm_front_both_axes() -> None:
    """Distillation keeps its cosine in the points' `accuracy` (its front's quality):
    one column named cosine. Language modelling ranks by exp(-loss), not by the token
    accuracy it stores: both columns."""
    cos = _pareto()
    for p in cos["points"]:
        p["quality"] = p["accuracy"]
    cos |= {"quality_label": "similarity to the float model", "accuracy_label": "cosine"}
    head = _text(front_table(cos)).splitlines()
    assert sum("cosine" in line for line in head[:4]) == 1
    assert not any("similarity" in line for line in head)
    assert "float baseline: cosine 0.9500" in "\n".join(head)
    lm = _pareto()
    for p, q in zip(lm["points"], (0.41, 0.44), strict=True):
        p["quality"] = q
    lm |= {"quality_label": "exp(-loss)", "accuracy_label": "token accuracy"}
    text = _text(front_table(lm))
    assert "token accuracy" in text
    assert "exp(-loss)" in text
    assert "0.4400" in text
