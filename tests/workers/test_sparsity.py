"""Sparsity kinds: exact counts (k zeros for top-k; M-N zeros in every group for N:M)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search_spaces import LayerPolicy, Policy
from workers.codec.bits import dequantize
from workers.compress.engine import compressible_layers, quantize
from workers.compress.quant import apply as apply_policy
from workers.compress.sparsity import layer_mask, nm_groups_view, nm_mask, supported_kinds


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4)])
@pytest.mark.parametrize("shape", [(16, 32), (8, 12, 3, 3), (4, 8, 1, 1)])
def test_nm_mask_leaves_exactly_m_minus_n_zeros_per_group(
    n: int, m: int, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape)
    keep = nm_mask(w, n, m)
    groups = nm_groups_view(keep, m)
    assert bool(((~groups).sum(dim=1) == m - n).all())
    assert int((~keep).sum()) == (m - n) * w.numel() // m
    # inside each group the kept weights are the largest
    wg = nm_groups_view(w.abs(), m)
    kept_min = torch.where(groups, wg, torch.inf).amin(dim=1)
    pruned_max = torch.where(~groups, wg, -torch.inf).amax(dim=1)
    assert bool((pruned_max <= kept_min).all())


def test_nm_groups_run_along_the_reduction_dimension() -> None:
    lin = torch.zeros(2, 8)
    lin[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    keep = nm_mask(lin, 2, 4)
    assert keep[0, :4].tolist() == [True, True, False, False]
    conv = torch.zeros(1, 4, 1, 2)  # groups are input channels at each kernel position
    conv[0, :, 0, 0] = torch.tensor([1.0, 5.0, 2.0, 7.0])
    keep = nm_mask(conv, 2, 4)
    assert keep[0, :, 0, 0].tolist() == [False, True, False, True]


def test_nm_on_ties_is_still_exact() -> None:
    keep = nm_mask(torch.ones(4, 16), 2, 4)
    assert int(keep.sum()) == 32


def test_nm_needs_a_divisible_reduction_dimension() -> None:
    with pytest.raises(ValueError, match=r"multiple of 4, but it is 6"):
        nm_mask(torch.randn(3, 6), 2, 4)
    assert supported_kinds(nn.Linear(6, 3)) == ["unstructured"]
    assert supported_kinds(nn.Linear(8, 3)) == ["unstructured", "2:4", "1:4"]
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    assert supported_kinds(depthwise) == ["unstructured"]


def test_layer_policy_refuses_a_wrong_nm_fraction() -> None:
    with pytest.raises(ValueError, match=r"prunes exactly 0.5 of the weights"):
        LayerPolicy(bits=4, sparsity=0.3, kind="2:4")
    assert LayerPolicy(bits=4, sparsity=0.75, kind="1:4").kind == "1:4"


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_unstructured_layer_mask_prunes_exactly_k(sparsity: float) -> None:
    w = torch.randn(24, 40)
    keep = layer_mask(w, LayerPolicy(bits=4, sparsity=sparsity))
    assert int((~keep).sum()) == round(sparsity * w.numel())


def test_nm_policy_then_quantization_keeps_the_pattern() -> None:
    """S→Q with N:M: the quantized weight keeps at most N nonzeros in every group and
    the scale is computed from the pruned weight."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    layers = {
        "0": LayerPolicy(bits=4, sparsity=0.5, kind="2:4"),
        "2": LayerPolicy(bits=3, sparsity=0.75, kind="1:4"),
    }
    apply_policy(model, Policy(layers=layers)).eval()
    for name, (n, m) in (("0", (2, 4)), ("2", (1, 4))):
        module = model.get_submodule(name)
        pruned = module.parametrizations.weight.original * module.parametrizations.weight[0].mask
        codes, scale = quantize(pruned, layers[name].bits)
        assert int((nm_groups_view(codes, m) != 0).sum(dim=1).max()) <= n
        assert torch.equal(module.weight, dequantize(codes, scale))  # eval: fully quantized


def test_compressible_layers_report_supported_kinds() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 1), nn.Linear(8, 3))
    kinds = {i.name: i.sparsity_kinds for i in compressible_layers(model)}
    assert kinds == {
        "0": ["unstructured"],
        "1": ["unstructured", "2:4", "1:4"],
        "2": ["unstructured", "2:4", "1:4"],
    }
