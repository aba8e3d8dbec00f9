"""Quant-Noise, complete (Fan, Stock et al., "Training with Quantization Noise for
Extreme Model Compression", ICLR 2021).

In each training forward pass a Bernoulli(p) mask over weight blocks picks the
blocks that are distorted; the others keep their float values and so receive
unbiased gradients. Blocks as the paper defines them: Linear/Embedding ``[out, in]``
runs of ``block`` consecutive input features; 1x1 conv runs of input channels; kxk
conv one whole kernel per (out, in) pair. Two noises:

- scalar int-N (N in 2..8), per channel or per tensor, symmetric or affine:
  ``phi(w) = (clamp(round(w/s) - z) + z) * s`` (:class:`ScalarQuantNoise`, sparq's one
  int-N Quant-Noise; the default policy's per-channel symmetric case is computed in
  place and exported in the compact ``q``/``qs``/``qsr``/``qnm`` encodings or their
  entropy-coded ``qe``/``qsre``/``qnme``);
- the PQ proxy: a distorted block is dropped (``phi = 0``) and the survivors are
  scaled by ``1/(1-p)`` (structured DropConnect), used before iPQ.

The noisy weight is computed functionally (``W + (phi(W) - W) * M`` with the
difference detached: straight-through on distorted blocks, exact gradients
elsewhere); the stored parameter never changes. In eval, scalar noise quantizes
every block (p = 1) and the PQ proxy is off.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from search_spaces._policy import FLOAT_BITS
from search_spaces.methods.quant_noise import QuantNoiseConfig
from workers.codec.bits import pack_codes, qmax, unpack_codes
from workers.codec.tensors import INT_CHANNEL_ENCODINGS
from workers.compress.engine import block_mask_shape, channel_scale, fitting_block
from workers.compress.quant._common import (
    Encodings,
    MethodHandler,
    WeightQuantizer,
    pattern_bound,
    register_handler,
    rows,
)
from workers.compress.sparsity import kind_mask

if TYPE_CHECKING:
    from torch import nn

    from search_spaces import LayerPolicy, Policy

_MIN_SCALE = 2.0**-14  # scales are stored in fp16


def noise_mask(w: torch.Tensor, p: float, block: int, layer: str = "") -> torch.Tensor:
    """Bernoulli(p) choice of blocks, expanded to ``w``'s shape (True = distorted)."""
    shape = block_mask_shape(w, block, layer)
    chosen = torch.rand(shape, device=w.device) < p
    if shape[1] != w.shape[1]:
        chosen = chosen.repeat_interleave(block, dim=1)
    return chosen.expand_as(w)


def mask_noise_(noise: torch.Tensor, p: float, block: int, layer: str = "") -> torch.Tensor:
    """Zero, in place, the noise of the blocks not chosen (kept with probability p);
    the block mask is broadcast, never expanded to the weight's size."""
    shape = block_mask_shape(noise, block, layer)
    chosen = torch.rand(shape, device=noise.device) < p
    if shape[1] != noise.shape[1]:
        noise.view(noise.shape[0], shape[1], block, -1).mul_(
            chosen.view(noise.shape[0], shape[1], 1, -1)
        )
    else:
        noise.mul_(chosen)
    return noise


def int_params(
    w: torch.Tensor, bits: int, granularity: str, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (``[out]`` each, or ``[1]`` per tensor); fp16-exact scales.

    Symmetric: ``s = max|W| / (2^(N-1) - 1)``, ``z = 0``. Affine (the paper's):
    ``s = (max W - min W) / (2^N - 1)``, ``z = round(min W / s)``; the range always
    includes 0 so that pruned weights stay exactly zero.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 for integer quantization, but got {bits}")
    if granularity not in ("channel", "tensor"):
        raise ValueError(f"granularity must be 'channel' or 'tensor', but got {granularity!r}")
    r = rows(w.detach())
    if granularity == "tensor":
        r = r.reshape(1, -1)
    if symmetric:
        scale = (r.abs().amax(dim=1) / qmax(bits)).clamp_min(_MIN_SCALE).half().float()
        return scale, torch.zeros_like(scale)
    lo, hi = r.amin(dim=1).clamp_max(0), r.amax(dim=1).clamp_min(0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(_MIN_SCALE).half().float()
    return scale, torch.round(lo / scale)


def int_codes(
    w: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool
) -> torch.Tensor:
    """Unsigned codes in ``[0, 2^N - 1]`` (symmetric: offset by ``qmax``)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    s, z = scale.view(shape), zero.view(shape)
    if symmetric:
        m = qmax(bits)
        return torch.clamp(torch.round(w / s), -m, m) + m
    return torch.clamp(torch.round(w / s) - z, 0, 2**bits - 1)


def int_dequant(
    codes: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool
) -> torch.Tensor:
    shape = (-1,) + (1,) * (codes.dim() - 1)
    s, z = scale.view(shape), zero.view(shape)
    return (codes - qmax(bits) if symmetric else codes + z) * s


def fake_int(w: torch.Tensor, bits: int, granularity: str, symmetric: bool) -> torch.Tensor:
    """phi_intN(w) (no gradient: callers add it as a detached difference)."""
    w = w.detach()
    scale, zero = int_params(w, bits, granularity, symmetric)
    return int_dequant(int_codes(w, bits, scale, zero, symmetric), bits, scale, zero, symmetric)


class ScalarQuantNoise(WeightQuantizer):
    """int-N Quant-Noise with any granularity/symmetry, and either order of sparsity
    and quantization (``sq``: prune the float weight, then quantize; ``qs``: quantize,
    then prune by the quantized magnitudes)."""

    mask: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        bits: int,
        sparsity: float,
        p: float,
        block: int,
        granularity: str = "channel",
        symmetric: bool = True,
        order: str = "sq",
        layer: str = "",
        kind: str = "unstructured",
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"layer {layer!r}: bits must be in 2..8, but got {bits}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"noise rate p must lie in [0, 1], but got {p}")
        if order not in ("sq", "qs"):
            raise ValueError(f"order must be 'sq' or 'qs', but got {order!r}")
        block = fitting_block(weight.shape[1], block)  # said on the job (describe_model)
        self.bits, self.p, self.block, self.layer = bits, p, block, layer
        self.granularity, self.symmetric, self.order = granularity, symmetric, order
        self.kind = kind
        w = weight.detach()
        source = w if order == "sq" else fake_int(w, bits, granularity, symmetric)
        mask = kind_mask(source, sparsity, kind, layer)  # unstructured or N:M
        self.register_buffer("mask", mask.to(torch.float32))
        self.dense = bool(mask.all())  # no pruning: skip the multiply
        # the policy's default (per-channel symmetric S->Q): one in-place chain
        self._fast = symmetric and granularity == "channel" and order == "sq"

    def _target(self, weight: torch.Tensor) -> torch.Tensor:
        if self.order == "sq":
            return fake_int(weight * self.mask, self.bits, self.granularity, self.symmetric)
        return fake_int(weight, self.bits, self.granularity, self.symmetric) * self.mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        base = weight if self.dense else weight * self.mask
        # The noise is a constant for autograd (straight-through): computing it without
        # building a graph, in place, keeps the step within a few percent of float.
        with torch.no_grad():
            if self._fast:  # = fake_int(base) - base, without its temporaries
                scale = channel_scale(base, self.bits).view((-1,) + (1,) * (base.dim() - 1))
                m = qmax(self.bits)
                noise = torch.div(base, scale).round_().clamp_(-m, m).mul_(scale).sub_(base)
            else:
                noise = self._target(weight).sub_(base)
            if self.training and self.p < 1.0:
                mask_noise_(noise, self.p, self.block, self.layer)
        return base + noise

    def weight_bits(self) -> float:
        return float(self.bits)

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        from workers.codec.tensors import encode_int_channel

        w = original.detach().float().cpu()
        src = w * self.mask.cpu() if self.order == "sq" else w
        scale, zero = int_params(src, self.bits, self.granularity, self.symmetric)
        codes = int_codes(src, self.bits, scale, zero, self.symmetric)
        if self.order == "qs":
            zc = qmax(self.bits) if self.symmetric else -zero.view(-1, *([1] * (w.dim() - 1)))
            codes = torch.where(self.mask.cpu().bool(), codes, torch.as_tensor(zc).expand_as(codes))
        if self.symmetric and self.granularity == "channel":
            # per-channel fp16 scales and signed codes: the checkpoint's own int-N
            # encodings (no head, pattern-coded when sparse, N:M-coded), never larger
            signed = (codes - qmax(self.bits)).to(torch.int8)
            enc, blob = encode_int_channel(signed, scale, self.bits, self.kind)
            return enc, self.bits, blob
        head = struct.pack("<BBH", self.granularity == "tensor", self.symmetric, scale.numel())
        zeros = b"" if self.symmetric else zero.numpy().astype("<i2").tobytes()
        blob = head + scale.numpy().astype("<f2").tobytes() + zeros
        # codes of zero weights differ per channel when affine: pack them densely then
        zero_code = qmax(self.bits) if self.symmetric else 256
        packed = codes.numpy().astype(np.uint8).reshape(-1)
        return "qx", self.bits, blob + pack_codes(packed, self.bits, zero_code)

    def encode_bound(self, shape: list[int], enc: str, bits: int, blob: bytes) -> float:
        if enc == "qx":
            return super().encode_bound(shape, enc, bits, blob)
        from workers.codec.tensors import int_channel_bound

        return int_channel_bound(shape, enc, bits, blob, self.kind)


def _decode_qx(shape: list[int], bits: int, blob: bytes) -> torch.Tensor:
    per_tensor, symmetric, nscale = struct.unpack_from("<BBH", blob)
    off = 4
    scale = torch.from_numpy(np.frombuffer(blob, "<f2", nscale, off).astype(np.float32))
    off += 2 * nscale
    zero = torch.zeros_like(scale)
    if not symmetric:
        zero = torch.from_numpy(np.frombuffer(blob, "<i2", nscale, off).astype(np.float32))
        off += 2 * nscale
    n = int(np.prod(shape))
    zero_code = qmax(bits) if symmetric else 256
    codes = unpack_codes(blob[off:], bits, n, zero_code).astype(np.float32)
    c = torch.from_numpy(codes).reshape(shape)
    if per_tensor:
        c = c.reshape(1, -1)
    return int_dequant(c, bits, scale, zero, bool(symmetric)).reshape(shape)


def _bound_qx(shape: list[int], bits: int, blob: bytes) -> float:
    _, symmetric, nscale = struct.unpack_from("<BBH", blob)
    side = 16.0 * nscale * (1 if symmetric else 2)  # fp16 scales (+ int16 zero points)
    return side + pattern_bound(_decode_qx(shape, bits, blob), bits)


class PQNoise(WeightQuantizer):
    """The PQ proxy noise: drop a Bernoulli(p) fraction of blocks, rescale the
    survivors by ``1/(1-p)``; off in eval. Trains a float model for a later iPQ."""

    def __init__(self, weight: torch.Tensor, *, p: float, block: int, layer: str = "") -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"PQ noise rate p must lie in [0, 1), but got {p}")
        self.p, self.block, self.layer = p, fitting_block(weight.shape[1], block), layer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return weight
        keep = ~noise_mask(weight, self.p, self.block, self.layer)
        return weight * keep / (1.0 - self.p)

    def weight_bits(self) -> float:
        return float(FLOAT_BITS)

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        w = original.detach().float().cpu().contiguous()
        return "raw:float32", 0, w.numpy().astype("<f4").tobytes()


@register_handler(QuantNoiseConfig)
class QuantNoiseHandler(MethodHandler):
    """int-N Quant-Noise on every quantized layer; the plain training loop."""

    encodings: ClassVar[Encodings] = {"qx": (_decode_qx, _bound_qx)}
    also_writes: ClassVar[tuple[str, ...]] = INT_CHANNEL_ENCODINGS  # per channel, symmetric

    def wrap(self, w: torch.Tensor, lp: LayerPolicy, policy: Policy, layer: str) -> nn.Module:
        cfg = policy.method
        assert isinstance(cfg, QuantNoiseConfig)
        return ScalarQuantNoise(
            w,
            bits=lp.bits,
            sparsity=lp.sparsity,
            p=policy.noise_rate,
            block=policy.noise_block,
            granularity=cfg.granularity,
            symmetric=cfg.symmetric,
            order=cfg.order,
            layer=layer,
            kind=lp.kind,
        )
