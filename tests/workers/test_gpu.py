"""The GPU path: a trial given a GPU trains and evaluates on it. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from search_spaces import LayerPolicy, Policy
from service.spec import DatasetSpec, ModelSpec
from workers.compress.engine import compressible_layers
from workers.compress.quant import apply as apply_policy
from workers.compress.train import evaluate, make_loader, pick_device, train_epochs
from workers.jobs import checkpoint as ckpt
from workers.zoo.data import digits
from workers.zoo.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_quant_noise_training_on_gpu_matches_its_checkpoint() -> None:
    device = pick_device(0.5)
    assert device.type == "cuda"
    train, val = digits()
    spec = ModelSpec(builtin="digits-cnn")
    model = build_model(spec)
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.5) for i in compressible_layers(model)}
    policy = Policy(layers=layers, noise_rate=0.5, noise_block=1)
    apply_policy(model, policy)
    train_epochs(model, make_loader(train, 64, shuffle=True), epochs=2, lr=1e-3, device=device)
    assert next(model.parameters()).device.type == "cuda"
    on_gpu = evaluate(model, make_loader(val, 512, shuffle=False), device)
    data = ckpt.encode(
        model.cpu(), model_spec=spec, dataset_spec=DatasetSpec(builtin="digits"), policy=policy
    )
    reloaded = evaluate(ckpt.decode(data).model, make_loader(val, 512, shuffle=False), device)
    assert abs(reloaded.accuracy - on_gpu.accuracy) <= 1 / 360
