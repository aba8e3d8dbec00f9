"""iPQ: iterative product quantization of weights (Stock et al., "And the Bit Goes
Down", ICLR 2020; used with Quant-Noise by Fan, Stock et al., ICLR 2021).

A weight is cut into sub-vectors (Linear/Embedding/1x1 conv: runs of ``block``
input features of one output row; kxk conv: one whole kernel per (out, in) pair,
the same blocks Quant-Noise distorts); k-means with ``K`` centroids replaces every
sub-vector by its nearest centroid. The layer then holds trainable centroids and
fixed assignments (:class:`PQWeight`, a parametrization of Linear, Conv2d and
Embedding). Layers are quantized in stages by type, and the centroids (with
everything still float) are fine-tuned on the task loss between stages.

Size model (exact, and what the checkpoint stores): ``ceil(log2 K)`` bits per
sub-vector for the assignment, ``K * block`` fp16 centroid values per layer, plus
a 4-byte (K, block) head; everything not quantized stays at 32 bits.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces._policy import FLOAT_BITS
from search_spaces.methods.ipq import IpqConfig
from workers.compress.engine import fitting_block
from workers.compress.quant._common import (
    Encodings,
    MethodHandler,
    Schedule,
    WeightQuantizer,
    original,
    register_handler,
    rows,
    weight,
)

if TYPE_CHECKING:
    from search_spaces import LayerPolicy, Policy

STAGES: tuple[tuple[str, tuple[type[nn.Module], ...]], ...] = (
    ("linear", (nn.Linear,)),  # the paper's FFN stage
    ("embedding", (nn.Embedding,)),
    ("conv2d", (nn.Conv2d,)),
)


def block_size(weight: torch.Tensor, block: int, layer: str = "") -> int:
    """The sub-vector length for this weight: kxk convs the kernel size, else `block` or
    its largest divisor of the input size (:func:`workers.compress.engine.fitting_block`)."""
    if weight.dim() == 4 and weight.shape[2:] != (1, 1):
        return int(weight.shape[2] * weight.shape[3])
    return fitting_block(rows(weight).shape[1], block)  # said on the job, as noise blocks


def subvectors(weight: torch.Tensor, block: int, layer: str = "") -> torch.Tensor:
    """``[n_sub, bs]``: the sub-vectors k-means clusters."""
    bs = block_size(weight, block, layer)
    return rows(weight.detach()).reshape(-1, bs)


def kmeans(
    x: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means; empty clusters are re-seeded by splitting the most populated one.

    Returns ``(centroids [k, d], assignments [n])``.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of sub-vectors, but got k={k}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            big = int(counts.argmax())
            eps = 1e-3 * (x.std() + 1e-8) * torch.randn(x.shape[1], generator=gen)
            new[empty], new[big] = new[big] + eps, new[big] - eps
            counts[empty] = counts[big] // 2
            counts[big] -= counts[empty]
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids, torch.cdist(x, centroids).argmin(dim=1)


def index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def size_bits(numel: int, k: int, bs: int) -> int:
    """The exact size model of one PQ layer, in bits (assignments + fp16 centroids + head)."""
    return (numel // bs) * index_bits(k) + k * bs * 16 + 32


class PQWeight(WeightQuantizer):
    """Parametrization: the weight is ``centroids[assignments]``; the centroids are a
    trainable parameter (used at fp16 precision, as stored), assignments are fixed."""

    assignments: torch.Tensor
    centroids: nn.Parameter

    def __init__(self, weight: torch.Tensor, *, k: int, block: int, layer: str = "", seed: int = 0):
        super().__init__()
        x = subvectors(weight, block, layer).float().cpu()
        k = min(k, x.shape[0])  # a tiny layer has fewer sub-vectors than centroids
        centroids, assign = kmeans(x, k, seed=seed)
        self.k, self.bs, self.layer = k, x.shape[1], layer
        self.centroids = nn.Parameter(centroids.to(weight.device))
        self.register_buffer("assignments", assign.to(weight.device))

    def _weight(self, like: torch.Tensor) -> torch.Tensor:
        cents = self.centroids
        c = cents + (cents.half().float() - cents).detach()  # at the stored (fp16) precision
        return c[self.assignments].reshape(like.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self._weight(weight)

    def weight_bits(self) -> float:
        return 16.0  # the reconstructed weight is fp16

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        from workers.codec.bits import pack_bits

        bits = index_bits(self.k)
        head = struct.pack("<HH", self.k, self.bs)
        cents = self.centroids.detach().cpu().numpy().astype("<f2").tobytes()
        codes = self.assignments.cpu().numpy().astype(np.uint8)
        return "pq", bits, head + cents + pack_bits(codes, bits)


def _decode_pq(shape: list[int], bits: int, blob: bytes) -> torch.Tensor:
    from workers.codec.bits import unpack_bits

    k, bs = struct.unpack_from("<HH", blob)
    cents = np.frombuffer(blob, "<f2", k * bs, 4).astype(np.float32).reshape(k, bs)
    n = int(np.prod(shape)) // bs
    assign = unpack_bits(blob[4 + 2 * k * bs :], bits, n).astype(np.int64)
    return torch.from_numpy(cents[assign]).reshape(shape)


def _bound_pq(shape: list[int], bits: int, blob: bytes) -> float:
    k, bs = struct.unpack_from("<HH", blob)
    # fp16 centroids, then one index of `bits` per sub-vector
    return 16.0 * k * bs + float(bits * (int(np.prod(shape)) // bs))


def quantize_layers(
    model: nn.Module, names: Sequence[str], *, k: int, block: int, seed: int = 0
) -> None:
    """Replace each named layer's weight by a :class:`PQWeight` fitted by k-means to its
    current float weight (a Quant-Noise parametrization, if any, is dropped first)."""
    for name in names:
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        parametrize.register_parametrization(
            module, "weight", PQWeight(weight(module), k=k, block=block, layer=name, seed=seed)
        )
        original(module).requires_grad_(False)


def staged(
    model: nn.Module,
    names: Sequence[str],
    *,
    k: int,
    block: int,
    finetune: Callable[[nn.Module], None],
    seed: int = 0,
) -> list[str]:
    """iPQ in stages by layer type (linear, embedding, conv2d): quantize a stage, then
    ``finetune`` (centroids and the still-float layers) before the next. Returns the
    stages run, in order."""
    done = []
    for stage, types in STAGES:
        group = [n for n in names if isinstance(model.get_submodule(n), types)]
        if not group:
            continue
        quantize_layers(model, group, k=k, block=block, seed=seed)
        finetune(model)
        done.append(stage)
    return done


class PQExactNoise(WeightQuantizer):
    """Quant-Noise with the exact PQ noise: a distorted block is replaced by its nearest
    codeword (centroids from k-means on the weight at wrap time, kept fixed), with
    straight-through gradients; ``p = 1`` is full-STE QAT with PQ. Training only: it is
    followed by :func:`staged` iPQ, and is not exported itself."""

    centroids: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, *, k: int, block: int, p: float, layer: str = "", seed: int = 0
    ):
        super().__init__()
        x = subvectors(weight, block, layer).float().cpu()
        k = min(k, x.shape[0])
        centroids, _ = kmeans(x, k, seed=seed)
        self.register_buffer("centroids", centroids.to(weight.device))
        self.block, self.p, self.layer = block, p, layer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return weight
        with torch.no_grad():
            x = subvectors(weight, self.block, self.layer)
            nearest = self.centroids[torch.cdist(x, self.centroids).argmin(dim=1)]
            noise = (nearest - x).reshape(weight.shape)
            if self.p < 1.0:
                chosen = torch.rand(x.shape[0], 1, device=weight.device) < self.p
                noise = (noise.reshape(x.shape) * chosen).reshape(weight.shape)
        return weight + noise

    def weight_bits(self) -> float:
        return 32.0

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        raise ValueError(f"layer {self.layer!r}: PQ training noise is not an export format")


@register_handler(IpqConfig)
class IpqHandler(MethodHandler):
    """PQ-proxy Quant-Noise while fine-tuning, then iPQ in stages, each followed by a
    third of the epochs tuning the centroids and the still-float layers."""

    encodings: ClassVar[Encodings] = {"pq": (_decode_pq, _bound_pq)}

    def wrap(self, w: torch.Tensor, lp: LayerPolicy, policy: Policy, layer: str) -> nn.Module:
        from workers.compress.quant.quant_noise import PQNoise

        cfg = policy.method
        assert isinstance(cfg, IpqConfig)
        block_size(w, cfg.block, layer)  # fail early on a bad block size
        rate = policy.noise_rate if policy.noise_rate < 1.0 else 0.0
        return PQNoise(w, p=rate, block=cfg.block, layer=layer)

    def finetune(self, model: nn.Module, policy: Policy, schedule: Schedule) -> dict[str, Any]:
        cfg = policy.method
        assert isinstance(cfg, IpqConfig)
        schedule.train(model)
        quantized = [n for n, lp in policy.layers.items() if lp.bits != FLOAT_BITS]
        stage_epochs = max(1, schedule.epochs // 3)

        def tune_centroids(m: nn.Module) -> None:
            schedule.train(m, stage_epochs, report=False)

        stages = staged(
            model,
            quantized,
            k=cfg.centroids,
            block=cfg.block,
            finetune=tune_centroids,
            seed=schedule.seed,
        )
        return {"ipq_stages": stages}
