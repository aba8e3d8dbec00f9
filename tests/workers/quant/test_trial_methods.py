"""Every method is reachable from a job spec: spec -> knob space -> sampled params ->
policy -> the trial's work (apply, fine-tune, export, measure the decoded checkpoint)
-> a reloadable checkpoint with the same accuracy, and BOPs next to size_bytes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from search_spaces import KnobSpace, LayerPolicy, Policy, policy_from_params, to_optuna
from search_spaces.methods import METHODS
from service.spec import JobSpec
from workers.compress.engine import compressible_layers
from workers.jobs import checkpoint as ckpt
from workers.jobs.baseline import evaluate_bytes
from workers.jobs.trial import compress
from workers.zoo.models import build_model

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 32}},
    "dataset": {"builtin": "digits"},
    "search_space": {
        "method": list(METHODS),
        "weight_bits": [4, 8],
        "sparsity": {"low": 0.0, "high": 0.5},
        "granularity": ["channel", "tensor"],
        "symmetric": [True, False],
        "ipq": {"block_sizes": [4], "centroids": [8, 16]},
        "mx_element": ["int", "fp"],
        "activation": {"bits": [8, 32]},
        "geta": {
            "warmup_steps": 2,
            "projection_steps": 4,
            "projection_periods": 2,
            "joint_steps": 4,
            "pruning_periods": 2,
            "cooldown_steps": 2,
        },
        "geta_group_sparsity": {"low": 0.1, "high": 0.4},
        "finetune_epochs": 1,
    },
}


def _space(spec: JobSpec, model: torch.nn.Module) -> KnobSpace:
    return spec.search_space.knob_space([i.model_dump() for i in compressible_layers(model)])


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_as_a_trial_and_exports_a_reloadable_checkpoint(method: str) -> None:
    spec = JobSpec.model_validate(SPEC)
    torch.manual_seed(0)
    model = build_model(spec.model)
    space = _space(spec, model)
    dists = to_optuna(space)
    assert {"method", "granularity", "symmetric", "ipq_centroids", "act_bits"} <= set(dists)
    assert "geta_sparsity" in dists
    rng = np.random.default_rng(0)
    params: dict[str, Any] = {}
    for key, dist in dists.items():
        if hasattr(dist, "choices"):
            params[key] = dist.choices[int(rng.integers(len(dist.choices)))]
        else:
            params[key] = float(rng.uniform(dist.low, dist.high))  # type: ignore[attr-defined]
    params["method"] = method
    if method == "mx":
        params["mx_element"] = "fp"
    policy = policy_from_params(space, params)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    data, metrics = compress(spec, policy, state, torch.device("cpu"), seed=0)
    assert metrics["size_bytes"] == len(data)
    assert 0 < metrics["relative_bops"] <= 1.0
    assert metrics["bops"] > 0
    back = ckpt.decode(data)
    assert back.policy is not None
    assert back.policy.method.name == method
    again = evaluate_bytes(data, spec, torch.device("cpu"))
    assert again.accuracy == metrics["accuracy"]
    if method == "geta":
        assert abs(metrics["group_sparsity"] - policy.method.target_group_sparsity) < 0.05


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_composes_with_channel_pruning_and_nm_sparsity(method: str) -> None:
    """Issue 4 meets the methods: channels pruned first, 2:4 in-layer masks where the
    method honours sparsity, then the method; the checkpoint replays the pruning and
    every tensor row carries an information bound below the file size."""
    spec = JobSpec.model_validate(SPEC)
    torch.manual_seed(0)
    model = build_model(spec.model)
    layers = {
        i.name: LayerPolicy(bits=4, sparsity=0.5, kind="2:4")
        for i in compressible_layers(model)
        if "2:4" in i.sparsity_kinds
    }
    first = next(iter(layers))
    policy = Policy(
        layers=layers,
        method=method,  # type: ignore[arg-type]
        channels={first: 0.25},
        geta=spec.search_space.geta,
    )
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    data, metrics = compress(spec, policy, state, torch.device("cpu"), seed=0)
    back = ckpt.decode(data)
    assert back.pruning, "the pruning record travels in the checkpoint"
    assert metrics["params"] < sum(p.numel() for p in model.parameters())
    assert 0 < metrics["info_bound_bytes"] < metrics["size_bytes"] == len(data)
    header, _ = ckpt.read_header(data)
    assert all(len(row) == 6 for row in header["tensors"])
    assert evaluate_bytes(data, spec, torch.device("cpu")).accuracy == metrics["accuracy"]
