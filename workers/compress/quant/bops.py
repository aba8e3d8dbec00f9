"""BOPs: bit operations of one forward pass of one sample.

Definition (the one sparq reports): for every Linear and Conv2d layer,
``MACs x weight bits x activation bits``, summed; a float weight or activation
counts 32 bits. ``relative_bops = bops / (MACs x 32 x 32)`` (the all-float model
is 1.0). MACs are counted per sample from a real forward pass (convolution
output size x input channels per group x kernel area; Linear in x out per
position); Embedding lookups and elementwise layers count no MACs. Weight bits are
what the arithmetic sees: int-N for scalar methods, element bits plus the shared
exponent amortized over the block for MX/BFP, GETA's learned (rounded) bits, and
16 for iPQ (its weights are rebuilt from fp16 centroids). Sparsity does not reduce
BOPs here (dense arithmetic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from search_spaces._policy import FLOAT_BITS
from workers.compress.batch import Inputs, call, first_rows, to_device
from workers.compress.quant._common import WeightQuantizer, parametrization
from workers.compress.quant.actquant import act_bits


@dataclass(frozen=True)
class Bops:
    bops: float
    macs: int
    relative: float
    per_layer: dict[str, tuple[int, float, int]]  # name -> (MACs, weight bits, act bits)


def weight_bits(module: nn.Module) -> float:
    pm = parametrization(module)
    return pm.weight_bits() if isinstance(pm, WeightQuantizer) else float(FLOAT_BITS)


@torch.no_grad()
def count_bops(model: nn.Module, example: Inputs) -> Bops:
    """BOPs of ``model`` on one sample shaped like ``example`` (batch dim included)."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            n = out.shape[0]
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                per = out[0].numel() * (module.in_channels // module.groups) * k
            elif isinstance(module, nn.Linear):
                per = (out.numel() // n) * module.in_features
            else:
                return
            macs[name] = macs.get(name, 0) + int(per)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        call(model, to_device(first_rows(example, 1), device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_layer = {
        name: (m, weight_bits(model.get_submodule(name)), act_bits(model.get_submodule(name)))
        for name, m in macs.items()
    }
    total = sum(m * wb * ab for m, wb, ab in per_layer.values())
    all_macs = sum(macs.values())
    return Bops(total, all_macs, total / max(1, all_macs * FLOAT_BITS**2), per_layer)
