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
from workers.engine import magnitude_mask

__all__ = ["kind_mask", "layer_mask", "nm_groups_view", "nm_mask", "supported_kinds"]


def nm_groups_view(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The weight as ``[groups, m]`` runs along the reduction dimension (a view or copy)."""
    w = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    if w.shape[-1] % m != 0:
        raise ValueError(
            f"N:M sparsity with M={m} needs the reduction dimension to be a multiple of {m}, "
            f"but it is {w.shape[-1]} (weight shape {tuple(weight.shape)})"
        )
    return w.reshape(-1, m)


def _from_groups(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        out, cin, kh, kw = like.shape
        return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return groups.reshape(like.shape)


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
    return _from_groups(keep, weight)


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
