"""The compression engine's primitives: magnitude sparsity, per-channel symmetric
int-N quantization with fp16 scales, the Quant-Noise block shape, and the layers a
policy can address. Pure torch; usable without Ray.

Quant-Noise itself (Fan, Stock et al., ICLR 2021: a random fraction ``p`` of weight
blocks quantized in each training pass, straight-through gradients, fully quantized
in eval) is one parametrization, :class:`workers.compress.quant.quant_noise.ScalarQuantNoise`;
:func:`workers.compress.quant.apply` attaches it (or the policy's other method).

Sparsity is applied before quantization (Harma et al., ICLR 2025: S->Q is the
optimal order for magnitude pruning with max-scaled quantization): the pruning
mask is computed from the float weights with an exact top-k, and the quantization
scale is computed from the pruned weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces import LayerInfo
from workers.codec.bits import qmax
from workers.compress.sparsity import supported_kinds

COMPRESSIBLE = (nn.Linear, nn.Conv2d, nn.Embedding)
_KINDS = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}
_MIN_SCALE = 2.0**-14  # smallest normal fp16: scales are stored in fp16


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


def fitting_block(fan_in: int, block: int) -> int:
    """The block size a layer of input size ``fan_in`` takes for a requested ``block``:
    ``block`` itself when it divides ``fan_in``, else its largest divisor below ``block``
    (1 at worst), so a layer whose width the block does not divide (a squeeze-excitation
    to 6 channels under blocks of 4) is still quantized under noise, not failed."""
    return next(b for b in range(min(block, fan_in), 0, -1) if fan_in % b == 0)


def block_mask_shape(weight: torch.Tensor, block: int, layer: str = "") -> tuple[int, ...]:
    """Shape of the Bernoulli mask over Quant-Noise blocks, as the paper defines blocks.

    Linear ``[out, in]``: runs of ``block`` consecutive input features. 1x1 conv: runs
    of ``block`` input channels. kxk conv: one whole kernel per (out, in) pair. The
    parametrizations pass a block that fits (:func:`fitting_block`).
    """
    if weight.dim() == 4 and weight.shape[2:] != (1, 1):
        return (weight.shape[0], weight.shape[1], 1, 1)
    fan_in = weight.shape[1]
    if fan_in % block != 0:  # the wrappers take fitting_block(fan_in, block) first
        raise ValueError(
            f"layer {layer!r}: noise block size {block} must divide its input size {fan_in}; "
            f"choose a divisor of {fan_in}"
        )
    return (weight.shape[0], fan_in // block, *weight.shape[2:])


def block_adjustments(model: nn.Module, blocks: dict[str, list[int]]) -> dict[str, str]:
    """Layer -> what sparq does instead of a requested block size its input size does
    not divide (``blocks``: a knob name such as ``noise_block`` -> the sizes the job
    may use), for the job to say: the layer keeps its method with the largest block that
    fits (:func:`fitting_block`). kxk convs use whole kernels, so never appear."""
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, COMPRESSIBLE):
            continue
        w = module.weight
        if w.dim() == 4 and w.shape[2:] != (1, 1):
            continue
        fan_in = int(w.shape[1])
        said = [
            f"{knob} {b} does not divide its input size {fan_in}: blocks of "
            f"{fitting_block(fan_in, b)}"
            for knob, sizes in blocks.items()
            for b in sizes
            if fan_in % b
        ]
        if said:
            out[name] = "; ".join(said)
    return out


def _raw_weight(module: nn.Module) -> object:
    """The weight parameter itself (under a parametrization: its original)."""
    if parametrize.is_parametrized(module, "weight"):
        plist: Any = getattr(module, "parametrizations").weight  # noqa: B009 (typed as Any)
        return plist.original
    return module.weight


def tied_layers(model: nn.Module) -> dict[str, str]:
    """Layer -> the earlier layer whose weight parameter it shares (an LM head tied to
    its embedding): such a layer has no policy of its own; it is compressed as the
    layer it shares with (``workers.compress.quant.apply`` gives it the same
    parametrization) and its tensor is stored once."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            source = first.setdefault(id(_raw_weight(module)), name)
            if source != name:
                out[name] = source
    return out


def float_parameters(model: nn.Module) -> dict[str, str]:
    """Parameters of two or more dimensions outside the compressible layers (a
    functional call's weight, a custom module's, a class token), with why they stay
    float32: the engine compresses Linear, Conv2d and Embedding weights only."""
    held = {
        id(p)
        for m in model.modules()
        if isinstance(m, COMPRESSIBLE)
        for p in m.parameters(recurse=True)
    }
    return {
        name: (
            f"a bare parameter of shape {list(p.shape)} (used by a functional call or a "
            "custom module, not the weight of an nn.Linear, nn.Conv2d or nn.Embedding): "
            "kept float32, neither quantized nor pruned"
        )
        for name, p in model.named_parameters()
        if p.dim() >= 2 and id(p) not in held
    }


def compressible_layers(model: nn.Module) -> list[LayerInfo]:
    """The Linear, Conv2d and Embedding layers a policy can address, in module order
    (a layer sharing an earlier one's weight is not: :func:`tied_layers`)."""
    out = []
    tied = tied_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE) and name not in tied:
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
