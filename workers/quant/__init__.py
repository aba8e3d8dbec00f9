"""Quantization methods selectable by ``Policy.method`` (pure torch, no Ray):

- ``quant_noise``: int-N Quant-Noise, per channel or per tensor, symmetric or affine
  (:mod:`workers.quant.quant_noise`; the default, per-channel symmetric S->Q, is
  computed in place);
- ``ipq``: Quant-Noise's PQ proxy while fine-tuning, then iterative product
  quantization in stages (:mod:`workers.quant.ipq`);
- ``mx`` / ``bfp``: MX-like and block-floating-point weight formats
  (:mod:`workers.quant.blockfmt`);
- ``geta``: learned bit widths with joint structured pruning (:mod:`workers.quant.geta`).

Any of them can add activation quantization (``act_bits`` < 32,
:mod:`workers.quant.actquant`); :func:`count_bops` measures the cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from search_spaces import Policy
from search_spaces._policy import FLOAT_BITS
from workers.engine import compressible_layers
from workers.quant import actquant, geta, ipq
from workers.quant._common import (
    BOUNDS,
    DECODERS,
    FloatWeight,
    WeightQuantizer,
    parametrization,
    weight,
)
from workers.quant.blockfmt import BlockFormatWeight
from workers.quant.bops import Bops, count_bops
from workers.quant.quant_noise import PQNoise, ScalarQuantNoise

__all__ = [
    "BOUNDS",
    "DECODERS",
    "Bops",
    "FloatWeight",
    "WeightQuantizer",
    "apply",
    "count_bops",
    "finetune",
]

CALIBRATION_BATCHES = 4


def apply(model: nn.Module, policy: Policy) -> nn.Module:
    """Attach the policy's method to every layer it names (in place)."""
    known = {info.name for info in compressible_layers(model)}
    unknown = sorted(set(policy.layers) - known)
    if unknown:
        raise ValueError(f"policy names layers the model does not have: {unknown}")
    quantized = [n for n, lp in policy.layers.items() if lp.bits != FLOAT_BITS]
    if policy.method == "geta":
        geta.attach(model, quantized)
    for name, lp in policy.layers.items():
        module = model.get_submodule(name)
        w = weight(module)
        pm: nn.Module
        if policy.method == "geta" and lp.bits != FLOAT_BITS:
            continue
        if lp.bits == FLOAT_BITS:
            pm = FloatWeight(w, sparsity=lp.sparsity, kind=lp.kind, layer=name)
        elif policy.method == "quant_noise":
            pm = ScalarQuantNoise(
                w,
                bits=lp.bits,
                sparsity=lp.sparsity,
                p=policy.noise_rate,
                block=policy.noise_block,
                granularity=policy.granularity,
                symmetric=policy.symmetric,
                order=policy.order,
                layer=name,
                kind=lp.kind,
            )
        elif policy.method == "ipq":
            ipq.block_size(w, policy.ipq_block, name)  # fail early on a bad block size
            rate = policy.noise_rate if policy.noise_rate < 1.0 else 0.0
            pm = PQNoise(w, p=rate, block=policy.ipq_block, layer=name)
        else:
            pm = BlockFormatWeight(
                w,
                fmt=policy.method,
                bits=lp.bits,
                sparsity=lp.sparsity,
                element=policy.mx_element if policy.method == "mx" else "int",
                order=policy.order,
                layer=name,
                kind=lp.kind,
            )
        parametrize.register_parametrization(module, "weight", pm)
    if policy.act_bits != FLOAT_BITS:
        # inputs of Linear/Conv2d only: an Embedding's input is indices
        arith = [
            n for n in policy.layers if isinstance(model.get_submodule(n), nn.Linear | nn.Conv2d)
        ]
        actquant.attach(model, arith, policy.act_bits, policy.act_range)
    return model


def finetune(
    model: nn.Module,
    policy: Policy,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the wrapped model as its method prescribes; returns what it learned
    (``ipq_stages``, or GETA's ``geta_trace``)."""
    from workers.train import train_epochs

    model.to(device)
    if policy.act_bits != FLOAT_BITS:
        actquant.calibrate(
            model, (x for x, _ in itertools.islice(loader, CALIBRATION_BATCHES)), device
        )
    if policy.method == "geta":
        quantizers = {
            name: pm
            for name, module in model.named_modules()
            if isinstance(pm := parametrization(module), geta.GetaQuant)
        }
        trace = geta.train(model, loader, quantizers, policy.geta, device)
        return {"geta_trace": trace}
    train_epochs(model, loader, epochs=epochs, lr=lr, device=device, on_epoch=on_epoch)
    if policy.method != "ipq":
        return {}
    quantized = [n for n, lp in policy.layers.items() if lp.bits != FLOAT_BITS]
    stage_epochs = max(1, epochs // 3)

    def tune_centroids(m: nn.Module) -> None:
        m.to(device)
        train_epochs(m, loader, epochs=stage_epochs, lr=lr, device=device)

    stages = ipq.staged(
        model,
        quantized,
        k=policy.ipq_centroids,
        block=policy.ipq_block,
        finetune=tune_centroids,
        seed=seed,
    )
    return {"ipq_stages": stages}
