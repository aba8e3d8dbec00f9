"""The contract every quantization method passes: wrap -> train step -> eval ->
export -> reload -> identical outputs (STYLE.md, 'shared contract tests')."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces import LayerPolicy, Policy
from search_spaces.methods import METHODS as REGISTRY
from service.spec import ModelSpec
from workers.compress import quant
from workers.compress.engine import compressible_layers
from workers.jobs import checkpoint as ckpt
from workers.zoo.models import digits_cnn, digits_mlp

_GETA = {
    "warmup_steps": 2,
    "projection_steps": 4,
    "projection_periods": 2,
    "joint_steps": 4,
    "pruning_periods": 2,
    "cooldown_steps": 2,
    "target_group_sparsity": 0.25,
}
# Each registered method with its defaults (GETA's schedule shortened), then knob
# variants of some; a method added to the registry is in the contract unasked.
FAST: dict[str, dict[str, Any]] = {
    "ipq": {"noise_rate": 0.1, "ipq_centroids": 8},
    "geta": {"geta": _GETA},
}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("quant_noise", {"granularity": "tensor"}),
    ("quant_noise", {"symmetric": False}),
    ("quant_noise", {"order": "qs"}),
    ("quant_noise", {"granularity": "tensor", "symmetric": False, "order": "qs"}),
    ("mx", {"mx_element": "fp"}),
    ("mx", {"order": "qs"}),
    ("quant_noise", {"act_bits": 4}),
    ("mx", {"act_bits": 8, "act_range": "learned"}),
]
METHODS: list[tuple[str, dict[str, Any]]] = [
    (name, FAST.get(name, {})) for name in REGISTRY
] + VARIANTS
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items() if k != 'geta')}" for m, kw in METHODS]
MODELS = {"digits-mlp": lambda: digits_mlp(hidden=32), "digits-cnn": lambda: digits_cnn(width=8)}


def _data(n: int = 64, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


@pytest.mark.parametrize(("method", "kw"), METHODS, ids=IDS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_wrap_train_export_reload_gives_identical_outputs(
    method: str, kw: dict[str, Any], model_name: str
) -> None:
    torch.manual_seed(0)
    model = MODELS[model_name]()
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.5) for i in compressible_layers(model)}
    policy = Policy(layers=layers, method=method, **{"noise_rate": 0.5, **kw})
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    quant.apply(model, policy)
    # wrapping stores the float weights untouched
    for name in layers:
        orig = model.get_submodule(name).parametrizations.weight.original
        assert torch.equal(orig, stored[f"{name}.weight"])
    # a training step moves the weights and the loss is finite
    info = quant.finetune(model, policy, _data(), epochs=1, lr=1e-2, device=torch.device("cpu"))
    model.eval()
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y1, y1b = model(x), model(x)
    assert torch.equal(y1, y1b), "eval must be deterministic (no noise in eval)"
    data = ckpt.encode(
        model, model_spec=ModelSpec(builtin=model_name, kwargs=_kwargs(model_name)), policy=policy
    )
    back = ckpt.decode(data)
    with torch.no_grad():
        y2 = back.model(x)
    assert torch.equal(y1, y2), float((y1 - y2).abs().max())
    assert back.policy == policy
    if method == "ipq":
        assert info["ipq_stages"][0] == "linear"
    assert back.policy.method.name == method
    # the checkpoint really is compressed: smaller than the fp32 state
    fp32 = sum(v.numel() * 4 for v in stored.values())
    assert len(data) < fp32


def _kwargs(name: str) -> dict[str, Any]:
    return {"hidden": 32} if name == "digits-mlp" else {"width": 8}


@pytest.mark.parametrize(("method", "kw"), METHODS, ids=IDS)
def test_gradients_reach_the_trainable_parameters(method: str, kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.0) for i in compressible_layers(model)}
    policy = Policy(layers=layers, method=method, **{"noise_rate": 0.5, **kw})
    quant.apply(model, policy)
    if policy.act_bits != 32:
        quant.actquant.calibrate(model, [torch.rand(8, 1, 8, 8)], torch.device("cpu"))
    model.train()
    nn.functional.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.arange(8)).backward()
    for name in layers:
        module = model.get_submodule(name)
        assert parametrize.is_parametrized(module, "weight")
        g = module.parametrizations.weight.original.grad
        assert g is not None, name
        assert bool(g.abs().sum() > 0), name


def test_every_method_has_a_handler_and_its_encodings_are_checked_bytes() -> None:
    """Handlers register their encodings; the loader's byte checks
    (``workers/jobs/_ckpt_safety.py``, pure Python) know every one of them."""
    from workers.jobs import _ckpt_safety

    assert set(quant.HANDLERS) == set(REGISTRY.values())
    assert set(quant.DECODERS) == set(quant.BOUNDS)
    assert set(quant.DECODERS) <= set(_ckpt_safety.ENCODINGS)
    assert set(_ckpt_safety.METHOD_ENCODINGS) <= set(quant.DECODERS)
