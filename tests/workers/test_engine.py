"""Invariants of the compression engine (SEEDS.md, 'Invariants worth tests')."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces import LayerPolicy, Policy
from workers.codec.bits import dequantize, qmax
from workers.compress.engine import (
    block_adjustments,
    block_mask_shape,
    compressible_layers,
    fitting_block,
    quantize,
)
from workers.compress.quant import apply as apply_policy
from workers.compress.quant.quant_noise import ScalarQuantNoise
from workers.compress.sparsity import magnitude_mask
from workers.zoo.models import digits_cnn, digits_mlp


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.77, 0.95])
def test_magnitude_mask_prunes_exactly_k(sparsity: float) -> None:
    w = torch.randn(37, 53)
    keep = magnitude_mask(w, sparsity)
    k = round(sparsity * w.numel())
    assert int((~keep).sum()) == k
    if 0 < k < w.numel():  # every pruned weight is no larger than every kept one
        assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_magnitude_mask_is_exact_on_ties() -> None:
    w = torch.ones(10, 10)  # a threshold would prune all or nothing
    assert int((~magnitude_mask(w, 0.3)).sum()) == 30


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_codes_in_range_and_error_bounded(bits: int) -> None:
    w = torch.randn(16, 32)
    q, scale = quantize(w, bits)
    assert int(q.abs().max()) <= qmax(bits)
    err = (dequantize(q, scale) - w).abs()
    # rounding error is at most half a step (plus the fp16 rounding of the scale)
    assert bool((err <= scale.view(-1, 1) * 0.5 + 1e-3 * w.abs().amax(1, keepdim=True)).all())


def _noise(w: torch.Tensor, bits: int, p: float, block: int = 4) -> ScalarQuantNoise:
    return ScalarQuantNoise(w, bits=bits, sparsity=0.0, p=p, block=block, layer="layer")


def test_noise_never_mutates_the_stored_weights() -> None:
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {i.name: LayerPolicy(bits=2, sparsity=0.5) for i in compressible_layers(model)}
    apply_policy(model, Policy(layers=layers, noise_rate=0.5, noise_block=4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 1, 8, 8)).sum().backward()
    for name in layers:
        stored = model.get_submodule(name).parametrizations.weight.original
        assert torch.equal(stored, before[f"{name}.weight"])


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_distorted_fraction_is_close_to_p(p: float) -> None:
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    qn = _noise(w, bits=2, p=p).train()
    q, scale = quantize(w, 2)
    fq = dequantize(q, scale)
    out = qn(w)
    blocks_distorted = (out == fq).view(256, 64, 4).all(dim=2)
    blocks_clean = (out == w).view(256, 64, 4).all(dim=2)
    # each block is either fully quantized or fully float
    assert bool((blocks_distorted | blocks_clean).all())
    frac = (
        blocks_distorted.float().mean().item()
        - (fq == w).view(256, 64, 4).all(2).float().mean().item()
    )
    assert abs(frac - p) < 0.02


def test_no_noise_in_eval_and_full_quantization() -> None:
    w = torch.randn(32, 64)
    qn = _noise(w, bits=3, p=0.1).eval()
    q, scale = quantize(w, 3)
    assert torch.equal(qn(w), dequantize(q, scale))
    assert torch.equal(qn(w), qn(w))  # deterministic


def test_p_zero_trains_float_and_p_one_is_plain_qat() -> None:
    w = torch.randn(8, 16)
    assert torch.equal(_noise(w, 4, 0.0).train()(w), w)
    q, scale = quantize(w, 4)
    assert torch.equal(_noise(w, 4, 1.0).train()(w), dequantize(q, scale))


def test_straight_through_gradient_and_pruned_weights_get_none() -> None:
    w = torch.randn(8, 16, requires_grad=True)
    keep = magnitude_mask(w, 0.5)
    qn = ScalarQuantNoise(w, bits=2, sparsity=0.5, p=0.5, block=4, layer="layer").train()
    assert torch.equal(qn.mask.bool(), keep)
    qn(w).sum().backward()
    assert w.grad is not None
    assert torch.equal(w.grad, keep.float())  # identity through the quantizer, zero where pruned


def test_conv_blocks_are_whole_kernels() -> None:
    torch.manual_seed(2)
    w = torch.randn(16, 8, 3, 3)
    out = _noise(w, bits=2, p=0.5, block=1).train()(w)
    q, scale = quantize(w, 2)
    fq = dequantize(q, scale)
    per_kernel_q = (out == fq).flatten(2).all(2)
    per_kernel_f = (out == w).flatten(2).all(2)
    assert bool((per_kernel_q | per_kernel_f).all())


def test_a_block_that_does_not_divide_the_layer_is_replaced_and_said() -> None:
    assert ScalarQuantNoise(torch.ones(10, 64), bits=4, sparsity=0.0, p=0.5, block=3).block == 2
    assert [fitting_block(n, 4) for n in (64, 6, 30, 7, 2)] == [4, 3, 3, 1, 2]
    with pytest.raises(ValueError, match=r"block size 3 must divide its input size 64"):
        block_mask_shape(torch.ones(10, 64), 3, "fc")  # the primitive stays strict
    model = nn.Sequential(nn.Linear(64, 6), nn.Linear(6, 10), nn.Conv2d(6, 4, 3))
    said = block_adjustments(model, {"noise_block": [4]})
    assert said == {"1": "noise_block 4 does not divide its input size 6: blocks of 3"}


def test_apply_policy_rejects_unknown_layers() -> None:
    model = digits_cnn()
    with pytest.raises(ValueError, match="does not have"):
        apply_policy(model, Policy(layers={"nope": LayerPolicy(bits=4, sparsity=0.0)}))


def test_sparsity_is_applied_before_quantization() -> None:
    """S->Q: the scale comes from the pruned weights, and pruned weights stay exactly 0."""
    torch.manual_seed(3)
    lin = nn.Linear(64, 16)
    apply_policy(nn.Sequential(lin), Policy(layers={"0": LayerPolicy(bits=4, sparsity=0.6)}))
    lin.eval()
    w = lin.weight  # fully quantized in eval
    keep = lin.parametrizations.weight[0].mask.bool()
    assert bool((w[~keep] == 0).all())
    q, scale = quantize(lin.parametrizations.weight.original * keep, 4)
    assert torch.equal(w, dequantize(q, scale))
    assert parametrize.is_parametrized(lin, "weight")
