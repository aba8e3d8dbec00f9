"""The generality suite of ``transformers`` architectures (issue 14, item 5) on the real
stack: a BERT classifier, a GPT-2 causal LM, a ViT and a ResNet, each the library's
own class from a tiny random config (tests/hf_nets.py, built offline), submitted by
entrypoint through the REST API and returned as-is: dict inputs, ``ModelOutput``
outputs, GPT-2's ``Conv1D``s and tied head, ViT's bare class token and position
embeddings, ResNet's batch norms. Every job succeeds with both trials, compresses the
model, and every front point, downloaded and reloaded, re-evaluates to the reported
metrics exactly. Each job is tiny (2 trials, 1 fine-tune epoch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_stack import Stack

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, here or on the stack
pytest.importorskip("transformers")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DIGITS_PIXELS = {"entrypoint": "tests.hf_nets:digits_pixels"}


def _job(net: str, dataset: dict[str, Any], **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": f"hf-{net}",
        "model": {"entrypoint": f"tests.hf_nets:{net}"},
        "dataset": dataset,
        "baseline": {"epochs": 4, "lr": 0.003},
        "search_space": {
            "weight_bits": [4, 8],
            "sparsity": {"low": 0.2, "high": 0.6},
            "sparsity_kinds": ["unstructured", "2:4", "channel"],
            "channel_sparsity": {"low": 0.25, "high": 0.5},
            "finetune_epochs": 1,
        },
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": 2, "concurrency": 2, "seed": 3},
    }
    spec.update(over)
    return spec


JOBS: dict[str, dict[str, Any]] = {
    "bert": _job("bert_classifier", {"entrypoint": "tests.hf_nets:digits_tokens"}),
    "gpt2": _job(
        "gpt2_lm",
        {"builtin": "python-text", "kwargs": {"max_chars": 12_000}},
        task="language_modeling",
        baseline={"epochs": 2, "lr": 0.005, "batch_size": 32},
    ),
    "vit": _job("vit_classifier", DIGITS_PIXELS),
    "resnet": _job("resnet_classifier", DIGITS_PIXELS, baseline={"epochs": 4, "lr": 0.005}),
}


def _front_points_reproduce(stack: Stack, job: dict[str, Any], tmp: Path) -> list[Any]:
    """Download every front point, reload it, re-evaluate on the job's validation
    data: the reported metrics, exactly. Returns the reloaded checkpoints."""
    import torch

    from workers.compress.train import evaluate, make_loader
    from workers.jobs.checkpoint import load_checkpoint, size_report
    from workers.zoo.data import build_datasets

    pareto = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/pareto", timeout=30).json()
    assert pareto["points"], pareto
    loaded = []
    for p in pareto["points"]:
        r = httpx.get(
            f"{stack.api}/v1/jobs/{job['id']}/trials/{p['trial_id']}/checkpoint", timeout=60
        )
        assert r.status_code == 200, r.text
        path = tmp / f"{p['trial_id']}.sparq"
        path.write_bytes(r.content)
        assert path.stat().st_size == p["size_bytes"] == size_report(r.content)["size_bytes"]
        ck = load_checkpoint(path, allow_modules=("tests.hf_nets",))
        _, val = build_datasets(ck.dataset_spec, allowed=("tests.hf_nets",))  # type: ignore[arg-type]
        got = evaluate(ck.model, make_loader(val, 512, shuffle=False), torch.device("cpu"), ck.task)
        assert got.accuracy == pytest.approx(p["accuracy"], abs=1e-12)
        assert got.loss == pytest.approx(p["loss"], rel=1e-9)
        loaded.append(ck)
    return loaded


@pytest.mark.parametrize("kind", list(JOBS))
def test_a_transformers_model_as_it_is(shared_stack: Stack, kind: str, tmp_path: Path) -> None:
    job = shared_stack.wait(shared_stack.post(JOBS[kind])["id"], timeout=420)
    assert job["status"] == "succeeded", job
    assert job["trials_completed"] == 2, job
    trials = httpx.get(f"{shared_stack.api}/v1/jobs/{job['id']}/trials", timeout=30).json()
    assert [t["status"] for t in trials] == ["completed"] * 2, trials
    assert not [w for w in job["warnings"] if "baseline" in w], job  # it learned something
    # compressed: int8 at worst on every big weight, so at least 2x smaller
    assert job["best"]["size_bytes"] * 2 < job["baseline"]["size_bytes"], job
    dense, adjusted = job["layers_left_dense"], job["layers_adjusted"]
    if kind == "gpt2":  # Conv1D compressed as Linear, not kept float32
        assert "transformer.h.0.attn.c_attn" in adjusted
        kept_float = [k for k, why in dense.items() if "kept float32" in why]
        assert not any("c_attn" in k or "c_fc" in k for k in kept_float), dense
        assert "lm_head" in adjusted  # tied to wte: one policy, stored once
    if kind == "vit":  # the bare parameters are kept float32, said, not a failure
        assert any("cls_token" in k for k in dense), dense
    points = _front_points_reproduce(shared_stack, job, tmp_path)
    assert all(ck.task == JOBS[kind].get("task", "classification") for ck in points)
