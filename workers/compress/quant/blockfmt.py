"""Block formats for weights, from the sparsity x quantization interplay study
(Harma et al., ICLR 2025):

- ``mx``: MX-like. Blocks of 32 consecutive weights along the reduction dimension
  share a power-of-two scale ``2^e`` (one int8 exponent per block); elements are
  int-N (``e = floor(log2 amax) - (N - 2)``, codes in ``[-(2^(N-1)-1), 2^(N-1)-1]``)
  or small floats (FP8 E4M3, FP6 E2M3, FP4 E2M1; ``e = floor(log2 amax) - emax``).
- ``bfp``: block floating point (HBFP-like). Blocks of 64 share one exponent; each
  element is an N-bit sign-magnitude mantissa. Training uses stochastic rounding,
  evaluation and export round to nearest.

Rows whose length is not a multiple of the block are zero-padded (the padding is
not stored). Sparsity and quantization compose in either order: ``sq`` prunes
the float weight then quantizes (the paper's optimal order); ``qs`` quantizes and
prunes by the quantized magnitudes (ties among equal codes make it drop weights
that were larger in full precision).
"""

from __future__ import annotations

import struct
from functools import cache
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from search_spaces.methods.bfp import BfpConfig
from search_spaces.methods.mx import MxConfig
from workers.codec.bits import pack_codes, qmax, unpack_codes
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

BLOCK = {"mx": 32, "bfp": 64}
FP_ELEMENTS = {8: (4, 3), 6: (2, 3), 4: (2, 1)}  # bits -> (exponent bits, mantissa bits)


@cache
def fp_grid(bits: int) -> torch.Tensor:
    """The non-negative values of the OCP small-float element (E4M3 has no inf; its
    all-ones pattern is NaN and is left out)."""
    if bits not in FP_ELEMENTS:
        raise ValueError(
            f"MX float elements exist for {sorted(FP_ELEMENTS)} bits, but got {bits}; "
            "use mx_element='int' for other widths"
        )
    eb, mb = FP_ELEMENTS[bits]
    bias = 2 ** (eb - 1) - 1
    vals = []
    for e in range(2**eb):
        for m in range(2**mb):
            if bits == 8 and e == 2**eb - 1 and m == 2**mb - 1:
                continue  # NaN
            v = (m / 2**mb) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**mb) * 2.0 ** (e - bias)
            vals.append(v)
    return torch.tensor(sorted(vals), dtype=torch.float32)


def _emax(bits: int, element: str) -> int:
    if element == "int":
        return bits - 2
    return int(np.floor(np.log2(float(fp_grid(bits)[-1]))))


def _blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    r = rows(w)
    pad = (-r.shape[1]) % block
    if pad:
        r = torch.nn.functional.pad(r, (0, pad))
    return r.reshape(-1, block), pad


def block_quant(
    w: torch.Tensor,
    fmt: str,
    bits: int,
    element: str = "int",
    stochastic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dequantized weight, per-block exponents, unsigned element codes)``."""
    if fmt not in BLOCK:
        raise ValueError(f"block format must be one of {sorted(BLOCK)}, but got {fmt!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"block-format element bits must be in 2..8, but got {bits}")
    if element not in ("int", "fp") or (fmt == "bfp" and element != "int"):
        raise ValueError(f"element must be 'int' (or 'fp' for mx), but got {element!r}")
    b, _ = _blocks(w.detach().float(), BLOCK[fmt])
    amax = b.abs().amax(dim=1)
    e = torch.where(
        amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))), torch.full_like(amax, -127.0)
    )
    e = (e - _emax(bits, element)).clamp(-127, 127)
    v = b / torch.exp2(e).unsqueeze(1)
    if element == "int":
        m = qmax(bits)
        r = torch.floor(v + torch.rand_like(v)) if stochastic else torch.round(v)
        q = r.clamp(-m, m)
        codes = q + m
    else:
        grid = fp_grid(bits).to(v.device)
        mid = (grid[1:] + grid[:-1]) / 2
        idx = torch.bucketize(v.abs(), mid)
        q = torch.sign(v) * grid[idx]
        sign = (v < 0) & (idx > 0)
        codes = idx + sign * 2 ** (bits - 1)
    deq = (q * torch.exp2(e).unsqueeze(1)).reshape(w.shape[0], -1)[:, : rows(w).shape[1]]
    return deq.reshape(w.shape), e.to(torch.int8), codes.to(torch.uint8)


def _zero_code(bits: int, element: str) -> int:
    return qmax(bits) if element == "int" else 0


class BlockFormatWeight(WeightQuantizer):
    """Fake quantization in an MX-like or block-float format (straight-through), with
    magnitude sparsity in either order and optional Quant-Noise over blocks."""

    mask: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        fmt: str,
        bits: int,
        sparsity: float,
        element: str = "int",
        order: str = "sq",
        layer: str = "",
        kind: str = "unstructured",
    ) -> None:
        super().__init__()
        if order not in ("sq", "qs"):
            raise ValueError(f"order must be 'sq' or 'qs', but got {order!r}")
        self.fmt, self.bits, self.element, self.order, self.layer = fmt, bits, element, order, layer
        w = weight.detach()
        source = w if order == "sq" else block_quant(w, fmt, bits, element)[0]
        mask = kind_mask(source, sparsity, kind, layer)  # unstructured or N:M
        self.register_buffer("mask", mask.to(torch.float32))

    def _target(self, weight: torch.Tensor, stochastic: bool) -> torch.Tensor:
        fq = block_quant
        if self.order == "sq":
            return fq(weight * self.mask, self.fmt, self.bits, self.element, stochastic)[0]
        return fq(weight, self.fmt, self.bits, self.element, stochastic)[0] * self.mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        base = weight * self.mask
        stochastic = self.training and self.fmt == "bfp"
        return base + (self._target(weight, stochastic) - base).detach()

    def weight_bits(self) -> float:
        return self.bits + 8.0 / BLOCK[self.fmt]  # the shared exponent, amortized

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        w = original.detach().float().cpu()
        mask = self.mask.cpu()
        src = w * mask if self.order == "sq" else w
        _, e, codes = block_quant(src, self.fmt, self.bits, self.element)
        zc = _zero_code(self.bits, self.element)
        if self.order == "qs":
            full = torch.full_like(codes, zc)
            pmask, _ = _blocks(mask, BLOCK[self.fmt])
            codes = torch.where(pmask.bool(), codes, full)
        flat = codes.reshape(w.shape[0], -1)[:, : rows(w).shape[1]].numpy().reshape(-1)
        head = struct.pack("<BI", self.element == "fp", e.numel())
        return self.fmt, self.bits, head + e.numpy().tobytes() + pack_codes(flat, self.bits, zc)


def _decoder(fmt: str):  # type: ignore[no-untyped-def]
    def decode(shape: list[int], bits: int, blob: bytes) -> torch.Tensor:
        is_fp, nblocks = struct.unpack_from("<BI", blob)
        off = struct.calcsize("<BI")
        e = torch.from_numpy(np.frombuffer(blob, np.int8, nblocks, off).astype(np.float32))
        element = "fp" if is_fp else "int"
        n = int(np.prod(shape))
        out, fan = shape[0], n // shape[0]
        codes = unpack_codes(blob[off + nblocks :], bits, n, _zero_code(bits, element))
        c = torch.from_numpy(codes.astype(np.int64)).reshape(out, fan)
        pad = (-fan) % BLOCK[fmt]
        c = torch.nn.functional.pad(c, (0, pad), value=_zero_code(bits, element))
        c = c.reshape(-1, BLOCK[fmt])
        if element == "int":
            q = (c - qmax(bits)).float()
        else:
            half = 2 ** (bits - 1)
            q = torch.where(c >= half, -1.0, 1.0) * fp_grid(bits)[c % half]
        deq = (q * torch.exp2(e).unsqueeze(1)).reshape(out, -1)[:, :fan]
        return deq.reshape(shape)

    return decode


def _bound(fmt: str):  # type: ignore[no-untyped-def]
    decode = _decoder(fmt)

    def bound(shape: list[int], bits: int, blob: bytes) -> float:
        _, nblocks = struct.unpack_from("<BI", blob)
        return 8.0 * nblocks + pattern_bound(decode(shape, bits, blob), bits)  # int8 exponents

    return bound


@register_handler(MxConfig)
class MxHandler(MethodHandler):
    """MX-like blocks of 32 with int or small-float elements; plain training loop."""

    encodings: ClassVar[Encodings] = {"mx": (_decoder("mx"), _bound("mx"))}

    def wrap(self, w: torch.Tensor, lp: LayerPolicy, policy: Policy, layer: str) -> nn.Module:
        cfg = policy.method
        assert isinstance(cfg, MxConfig)
        return BlockFormatWeight(
            w,
            fmt="mx",
            bits=lp.bits,
            sparsity=lp.sparsity,
            element=cfg.element,
            order=cfg.order,
            layer=layer,
            kind=lp.kind,
        )


@register_handler(BfpConfig)
class BfpHandler(MethodHandler):
    """Block floating point, blocks of 64 with int mantissas; plain training loop."""

    encodings: ClassVar[Encodings] = {"bfp": (_decoder("bfp"), _bound("bfp"))}

    def wrap(self, w: torch.Tensor, lp: LayerPolicy, policy: Policy, layer: str) -> nn.Module:
        cfg = policy.method
        assert isinstance(cfg, BfpConfig)
        return BlockFormatWeight(
            w,
            fmt="bfp",
            bits=lp.bits,
            sparsity=lp.sparsity,
            element="int",
            order=cfg.order,
            layer=layer,
            kind=lp.kind,
        )
