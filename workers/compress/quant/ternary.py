"""Ternary weights: each output channel's weights become ``{-a, 0, +a}``.

Ternary Weight Networks (Li, Zhang and Liu, 2016): weights with ``|w| <= delta``,
``delta = threshold * mean|w|`` over the channel, are zero; the others keep their sign
at ``a``, the mean ``|w|`` of the kept ones (the least-squares scale for that
pattern), rounded to fp16 because the checkpoint stores it so. Trained with a
straight-through estimator. Exported as 2-bit codes (``-1, 0, 1``) with fp16
per-channel scales: exactly the checkpoint's own ``q``/``qs``/``qsr`` (``qnm`` for an
N:M layer) int-N encodings or their entropy-coded forms (``qe``/``qsre``/``qnme``), so a
loader needs nothing new.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from search_spaces import LayerPolicy, Policy
from search_spaces.methods.ternary import TernaryConfig
from workers.codec.tensors import INT_CHANNEL_ENCODINGS
from workers.compress.quant._common import MethodHandler, WeightQuantizer, register_handler, rows
from workers.compress.sparsity import kind_mask

BITS = 2  # codes -1, 0, 1 (qmax(2) == 1)


class TernaryWeight(WeightQuantizer):
    """The parametrization: sparsity mask from the float weight, then ternary."""

    mask: torch.Tensor

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        threshold: float,
        sparsity: float = 0.0,
        kind: str = "unstructured",
        layer: str = "",
    ) -> None:
        super().__init__()
        self.layer, self.threshold, self.kind = layer, threshold, kind
        mask = kind_mask(weight.detach(), sparsity, kind, layer)
        self.register_buffer("mask", mask.to(torch.float32))

    def codes_and_scale(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed codes in ``{-1, 0, 1}`` (the weight's shape) and the fp16-exact
        per-channel scale ``a``."""
        w = rows(weight * self.mask)
        mag = w.abs()
        delta = self.threshold * mag.mean(dim=1, keepdim=True)
        keep = (mag > delta).to(w.dtype)
        a = (mag * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        a = a.half().float()  # stored as fp16: the trained forward uses the exported one
        codes = torch.sign(w) * keep
        return codes.reshape(weight.shape), a

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codes, a = self.codes_and_scale(weight)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        q = codes * a.reshape(shape)
        if not self.training:
            return q  # exactly the decoded checkpoint
        masked = weight * self.mask
        return masked + (q - masked).detach()  # straight-through

    def weight_bits(self) -> float:
        return float(BITS)

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        from workers.codec.tensors import encode_int_channel

        with torch.no_grad():
            codes, a = self.codes_and_scale(original.detach().float().cpu())
        enc, blob = encode_int_channel(codes.to(torch.int8), a, BITS, self.kind)
        return enc, BITS, blob

    def encode_bound(self, shape: list[int], enc: str, bits: int, blob: bytes) -> float:
        from workers.codec.tensors import int_channel_bound

        return int_channel_bound(shape, enc, bits, blob, self.kind)


@register_handler(TernaryConfig)
class TernaryHandler(MethodHandler):
    """Ternary on every quantized layer; the plain training loop."""

    also_writes: ClassVar[tuple[str, ...]] = INT_CHANNEL_ENCODINGS

    def wrap(self, w: torch.Tensor, lp: LayerPolicy, policy: Policy, layer: str) -> nn.Module:
        cfg = policy.method
        assert isinstance(cfg, TernaryConfig)
        return TernaryWeight(
            w, threshold=cfg.threshold, sparsity=lp.sparsity, kind=lp.kind, layer=layer
        )
