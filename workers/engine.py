"""The compression engine: magnitude sparsity, then per-channel int-N fake
quantization under quantization noise. Pure torch; usable without Ray.

Quant-Noise (Fan, Stock et al., "Training with Quantization Noise for Extreme
Model Compression", ICLR 2021): in each training forward pass only a random
fraction ``p`` of weight blocks is quantized; the others keep their float values,
so they get unbiased gradients. Gradients pass straight through the distorted
blocks. ``p = 1`` is plain QAT, ``p = 0`` float training. Evaluation is always
fully quantized.

Sparsity is applied before quantization (Harma et al., ICLR 2025: S->Q is the
optimal order for magnitude pruning with max-scaled quantization): the pruning
mask is computed from the float weights with an exact top-k, and the quantization
scale is computed from the pruned weights.

The noisy weight is computed functionally in ``forward`` through a
``torch.nn.utils.parametrize`` parametrization; the stored float parameter is
never written (the reference implementation's in-place hook zeroed dropped blocks
for good).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces import LayerInfo, Policy
from search_spaces._policy import FLOAT_BITS

COMPRESSIBLE = (nn.Linear, nn.Conv2d, nn.Embedding)
_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
_MIN_SCALE = 2.0**-14  # smallest normal fp16: scales are stored in fp16


def qmax(bits: int) -> int:
    """Largest code magnitude of symmetric (restricted-range) int-N: 2^(N-1) - 1."""
    return int(2 ** (bits - 1) - 1)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning exactly ``round(sparsity * numel)`` smallest-magnitude weights.

    Exact top-k rather than a threshold: a threshold over-prunes on ties.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), but got {sparsity}")
    n = weight.numel()
    k = round(sparsity * n)
    keep = torch.ones(n, dtype=torch.bool, device=weight.device)
    if k > 0:
        drop = torch.topk(weight.detach().abs().flatten(), k, largest=False, sorted=False).indices
        keep[drop] = False
    return keep.view_as(weight)


def channel_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale, rounded to fp16 (as it is stored)."""
    absmax = weight.detach().abs().flatten(1).amax(dim=1)
    scale = (absmax / qmax(bits)).clamp_min(_MIN_SCALE)
    return scale.half().float()


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes in [-qmax, qmax] (int8) and the per-channel fp16-exact scale."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 for integer quantization, but got {bits}")
    scale = channel_scale(weight, bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    m = qmax(bits)
    q = torch.clamp(torch.round(weight.detach() / scale.view(shape)), -m, m)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return q.float() * scale.view(shape)


def block_mask_shape(weight: torch.Tensor, block: int, layer: str = "") -> tuple[int, ...]:
    """Shape of the Bernoulli mask over Quant-Noise blocks, as the paper defines blocks.

    Linear ``[out, in]``: runs of ``block`` consecutive input features. 1x1 conv: runs
    of ``block`` input channels. kxk conv: one whole kernel per (out, in) pair.
    """
    if weight.dim() == 4 and weight.shape[2:] != (1, 1):
        return (weight.shape[0], weight.shape[1], 1, 1)
    fan_in = weight.shape[1]
    if fan_in % block != 0:
        raise ValueError(
            f"layer {layer!r}: noise block size {block} must divide its input size {fan_in}; "
            f"choose a divisor of {fan_in}"
        )
    return (weight.shape[0], fan_in // block, *weight.shape[2:])


class QuantNoise(nn.Module):
    """Parametrization: ``W -> W*mask`` then int-N quantization of a random fraction
    ``p`` of blocks in training (all blocks in eval), with straight-through gradients."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor, bits: int, p: float, block: int, layer: str) -> None:
        super().__init__()
        if bits != FLOAT_BITS and not 2 <= bits <= 8:
            raise ValueError(f"layer {layer!r}: bits must be in 2..8 or 32, but got {bits}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"noise rate p must lie in [0, 1], but got {p}")
        self.register_buffer("mask", mask.to(torch.float32))
        self.dense = bool(mask.all())  # no pruning: skip the multiply
        self.bits, self.p, self.block, self.layer = bits, p, block, layer
        if bits != FLOAT_BITS:
            block_mask_shape(mask, block, layer)  # fail early on a bad block size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight if self.dense else weight * self.mask
        if self.bits == FLOAT_BITS:
            return w
        # The noise is a constant for autograd (straight-through): computing it without
        # building a graph, in place, keeps the step within a few percent of float.
        with torch.no_grad():
            scale = channel_scale(w, self.bits).view((-1,) + (1,) * (w.dim() - 1))
            m = qmax(self.bits)
            noise = torch.div(w, scale).round_().clamp_(-m, m).mul_(scale).sub_(w)
            if self.training and self.p < 1.0:
                shape = block_mask_shape(w, self.block, self.layer)
                chosen = torch.rand(shape, device=w.device) < self.p
                if shape[1] != w.shape[1]:  # runs of `block` inputs: broadcast, don't copy
                    blocks = noise.view(w.shape[0], shape[1], self.block, -1)
                    blocks.mul_(chosen.view(w.shape[0], shape[1], 1, -1))
                else:
                    noise.mul_(chosen)
        return w + noise


@dataclass(frozen=True)
class CompressedLayer:
    """One compressed weight as the checkpoint stores it."""

    name: str
    bits: int
    weight: torch.Tensor  # float, pruned (bits == 32) or the dequantized value
    codes: torch.Tensor | None  # int8 codes (None for float layers)
    scale: torch.Tensor | None


def compressible_layers(model: nn.Module) -> list[LayerInfo]:
    """The Linear, Conv2d and Embedding layers a policy can address, in module order."""
    from workers.sparsity import supported_kinds

    out = []
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            kind = next(k for t, k in _KINDS.items() if isinstance(module, t))
            out.append(
                LayerInfo(
                    name=name,
                    kind=kind,
                    numel=module.weight.numel(),
                    sparsity_kinds=supported_kinds(module),
                )
            )
    return out


def apply_policy(model: nn.Module, policy: Policy) -> nn.Module:
    """Prune (exact magnitude top-k from the current float weights), then attach the
    quantization-noise parametrization to every layer the policy names. In place.

    The in-layer mask follows the layer's sparsity kind (unstructured top-k or N:M,
    see :mod:`workers.sparsity`); structured channel pruning (``policy.channels``) is
    applied before this, by :func:`workers.pruning.prune_channels`."""
    from workers.sparsity import layer_mask

    known = {info.name for info in compressible_layers(model)}
    unknown = sorted(set(policy.layers) - known)
    if unknown:
        raise ValueError(f"policy names layers the model does not have: {unknown}")
    for name, lp in policy.layers.items():
        module = model.get_submodule(name)
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"layer {name!r} has no weight tensor")
        mask = layer_mask(weight, lp, name)
        parametrize.register_parametrization(
            module, "weight", QuantNoise(mask, lp.bits, policy.noise_rate, policy.noise_block, name)
        )
    return model


def compressed_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """The final (fully quantized, pruned) weight of every parametrized layer."""
    out: dict[str, CompressedLayer] = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        pq = module.parametrizations.weight[0]
        if not isinstance(pq, QuantNoise):
            continue
        w = (module.parametrizations.weight.original * pq.mask).detach()
        if pq.bits == FLOAT_BITS:
            out[name] = CompressedLayer(name, pq.bits, w, None, None)
        else:
            q, scale = quantize(w, pq.bits)
            out[name] = CompressedLayer(name, pq.bits, dequantize(q, scale), q, scale)
    return out
