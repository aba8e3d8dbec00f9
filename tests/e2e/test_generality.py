"""Generality on the real stack: one job per test network, submitted by entrypoint
through the REST API (sparq has no code for any of them), plus the builtin
character-level language model. Every front point is downloaded, reloaded and
re-evaluated to the reported metrics; structured-pruned points reload with fewer
parameters. One stack serves every job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import nets
from tests.e2e.test_stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _job(model: dict[str, Any], **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "generality",
        "model": model,
        "dataset": {"builtin": "digits"},
        "baseline": {"epochs": 4, "lr": 0.005},
        "search_space": {
            "weight_bits": [4, 8],
            "sparsity": {"low": 0.2, "high": 0.6},
            "sparsity_kinds": ["unstructured", "2:4", "channel"],
            "channel_sparsity": {"low": 0.25, "high": 0.5},
            "finetune_epochs": 1,
            "noise_block": 1,
        },
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 2, "concurrency": 2, "seed": 3},
    }
    spec.update(over)
    return spec


@pytest.fixture(scope="module")
def gstack(shared_stack: Stack) -> Stack:
    """The shared stack (tests/e2e/conftest.py): PYTHONPATH names the repository, so
    `tests.nets` is importable on the workers, as a user's package would be."""
    return shared_stack


def _front_points_reproduce(stack: Stack, job: dict[str, Any], tmp: Path) -> list[Any]:
    """Download every front point, reload it, re-evaluate: the reported metrics."""
    import torch

    from workers.compress.train import evaluate, make_loader
    from workers.jobs.checkpoint import load_checkpoint, size_report
    from workers.zoo.data import build_datasets

    pareto = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/pareto", timeout=30).json()
    assert pareto["points"], pareto
    loaded = []
    for p in pareto["points"]:
        r = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/trials/{p['trial_id']}/checkpoint")
        assert r.status_code == 200, r.text
        path = tmp / f"{p['trial_id']}.sparq"
        path.write_bytes(r.content)
        assert path.stat().st_size == p["size_bytes"] == size_report(r.content)["size_bytes"]
        ck = load_checkpoint(path, allow_modules=("tests.nets",))
        _, val = build_datasets(ck.dataset_spec)  # type: ignore[arg-type]
        got = evaluate(ck.model, make_loader(val, 512, shuffle=False), torch.device("cpu"))
        assert got.accuracy == pytest.approx(p["accuracy"], abs=1e-12)
        assert got.loss == pytest.approx(p["loss"], rel=1e-9)
        loaded.append(ck)
    return loaded


@pytest.mark.parametrize("net", nets.GENERALITY)
def test_generality_network_by_entrypoint(gstack: Stack, net: str, tmp_path: Path) -> None:
    from workers.compress.pruning import count_params
    from workers.zoo.models import build_model

    model = {"entrypoint": f"tests.nets:{net}"}
    extra = {"export": {"formats": ["sparq", "onnx"]}} if net == "tiny_transformer" else {}
    job = gstack.wait(gstack.post(_job(model, **extra))["id"], timeout=300)
    assert job["status"] == "succeeded", job
    assert job["trials_completed"] == 2, job
    trials = httpx.get(f"{gstack.api}/v1/jobs/{job['id']}/trials").json()
    assert all(t["policy"]["channels"] for t in trials)  # every trial pruned channels
    from service.spec import ModelSpec

    dense = count_params(build_model(ModelSpec.model_validate(model)))
    for ck in _front_points_reproduce(gstack, job, tmp_path):
        assert ck.pruning
        assert count_params(ck.model) < dense  # physically smaller, not only zeros
    if extra:
        assert (gstack.home / "jobs" / job["id"] / "best.onnx").stat().st_size > 0


def test_char_lm_job_optimizes_perplexity(gstack: Stack, tmp_path: Path) -> None:
    spec = _job(
        {"builtin": "char-lm", "kwargs": {"dim": 32, "depth": 1}},
        dataset={"builtin": "python-text", "kwargs": {"max_chars": 12_000}},
        task="language_modeling",
        baseline={"epochs": 2, "lr": 0.01, "batch_size": 32},
    )
    job = gstack.wait(gstack.post(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job
    points = _front_points_reproduce(gstack, job, tmp_path)
    assert points
    pareto = httpx.get(f"{gstack.api}/v1/jobs/{job['id']}/pareto", timeout=30).json()
    losses = [p["loss"] for p in pareto["points"]]
    assert losses == sorted(losses, reverse=True)  # bigger only if lower perplexity
