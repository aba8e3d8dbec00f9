"""In-layer sparsity kinds: unstructured magnitude top-k and N:M along the reduction
dimension. Both masks are computed from the float weights before quantization (S→Q;
Harma et al., "Effective Interplay between Sparsity and Quantization", ICLR 2025).

N:M keeps the ``N`` largest-magnitude weights of every run of ``M`` consecutive
weights along the reduction dimension (Mishra et al., "Accelerating Sparse Deep
Neural Networks", 2021: the 2:4 pattern of sparse tensor cores). For a Linear
``[out, in]`` the runs lie along ``in``; for a Conv2d ``[out, in, kh, kw]`` along the
input channels at each kernel position (the ``[out, kh, kw, in]`` layout), so the
checkpoint's N:M index coding and the mask agree on what a group is.
"""

from __future__ import annotations

import torch
from torch import nn

from search_spaces import LayerPolicy
from search_spaces._policy import NM_KINDS
from workers.codec.bits import from_groups, nm_groups_view

__all__ = ["kind_mask", "layer_mask", "nm_groups_view", "nm_mask", "supported_kinds"]


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


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` kept (``m - n`` pruned) weights in every group of ``m``.

    Ties are broken by position (``topk`` is exact), so no group ever keeps more or
    fewer than ``n``.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, but got N={n}, M={m}")
    groups = nm_groups_view(weight.detach().abs(), m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1, sorted=False).indices, True)
    return from_groups(keep, weight)


def supported_kinds(module: nn.Module) -> list[str]:
    """In-layer sparsity kinds a layer supports (N:M needs M | reduction dim; an Embedding
    takes unstructured only)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        return []
    red = weight.shape[1]
    kinds = ["unstructured"]
    if isinstance(module, nn.Embedding):
        return kinds  # a lookup table has no reduction dimension to group along
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return kinds  # depthwise/grouped: the reduction runs are too short to group
    kinds += [k for k, (_, m) in NM_KINDS.items() if red % m == 0]
    return kinds


def kind_mask(
    weight: torch.Tensor, sparsity: float, kind: str = "unstructured", layer: str = ""
) -> torch.Tensor:
    """The keep-mask of a sparsity kind: N:M groups, or unstructured magnitude top-k."""
    if kind in NM_KINDS:
        n, m = NM_KINDS[kind]
        try:
            return nm_mask(weight, n, m)
        except ValueError as e:
            raise ValueError(f"layer {layer!r}: {e}") from e
    return magnitude_mask(weight, sparsity)


def layer_mask(weight: torch.Tensor, lp: LayerPolicy, layer: str = "") -> torch.Tensor:
    """The keep-mask a layer policy asks for, computed from the float weight."""
    return kind_mask(weight, lp.sparsity, lp.kind, layer)
