"""Invariants of the quantization methods (SEEDS.md, 'Invariants worth tests')."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces import LayerPolicy, Policy
from search_spaces._policy import GetaSettings
from workers.compress import quant
from workers.compress.engine import compressible_layers
from workers.compress.quant import blockfmt, geta, ipq
from workers.compress.quant.quant_noise import PQNoise, ScalarQuantNoise, fake_int, noise_mask
from workers.zoo.models import digits_cnn, digits_mlp


@pytest.mark.parametrize(
    ("shape", "block", "blocks"),
    [
        ((64, 32), 4, (64, 8)),  # Linear / Embedding: runs of input features
        ((16, 8, 1, 1), 4, (16, 2, 1, 1)),  # 1x1 conv: runs of input channels
        ((16, 8, 3, 3), 4, (16, 8, 1, 1)),  # kxk conv: one kernel per (out, in)
    ],
)
def test_noise_blocks_follow_the_paper_and_drop_about_p(
    shape: tuple[int, ...], block: int, blocks: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    w = torch.randn(*shape)
    m = noise_mask(w, 0.3, block)
    assert m.shape == w.shape
    # every block is chosen as a whole
    if len(shape) == 2 or shape[2:] == (1, 1):
        grouped = m.reshape(shape[0], shape[1] // block, block, -1)
        assert bool((grouped.all(dim=2) | (~grouped).all(dim=2)).all())
    else:
        flat = m.flatten(2)
        assert bool((flat.all(dim=2) | (~flat).all(dim=2)).all())
    frac = [float(noise_mask(w, 0.3, block).float().mean()) for _ in range(50)]
    assert abs(sum(frac) / len(frac) - 0.3) < 0.02
    assert math.prod(blocks) > 0


@pytest.mark.parametrize("module", [nn.Linear(30, 4), nn.Embedding(10, 30), nn.Conv2d(30, 4, 1)])
def test_a_block_size_that_does_not_divide_takes_the_largest_that_does(module: nn.Module) -> None:
    """A width the requested block does not divide (a squeeze-excitation to 6 or 30
    channels) keeps its method with the largest block that fits, never a failed trial."""
    pm = ScalarQuantNoise(module.weight, bits=4, sparsity=0.0, p=0.5, block=4, layer="x")
    assert pm.block == 3
    pm.train()
    assert pm(module.weight).shape == module.weight.shape  # noise over blocks of 3
    assert ipq.block_size(module.weight, 4, "x") == 3
    assert PQNoise(module.weight, p=0.5, block=4).block == 3


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_noise_levels_and_error(granularity: str, symmetric: bool, bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q = fake_int(w, bits, granularity, symmetric)
    rows = q if granularity == "channel" else q.reshape(1, -1)
    for r in rows:
        assert len(torch.unique(r)) <= 2**bits
    step = (w.max() - w.min()) / (2**bits - 1 if not symmetric else 2 ** (bits - 1) - 1)
    assert float((q - w).abs().max()) <= float(step)
    assert torch.equal(fake_int(torch.zeros(3, 4), bits, granularity, symmetric), torch.zeros(3, 4))


def test_scalar_noise_is_off_in_eval_and_never_writes_the_weight() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    before = lin.weight.detach().clone()
    pm = ScalarQuantNoise(lin.weight, bits=2, sparsity=0.0, p=0.25, block=4, granularity="tensor")
    parametrize.register_parametrization(lin, "weight", pm)
    lin.train()
    changed = [float((lin.weight != before).float().mean()) for _ in range(40)]
    assert 0.15 < sum(changed) / len(changed) < 0.35  # about p of the weights are distorted
    lin.eval()
    assert torch.equal(lin.weight, fake_int(before, 2, "tensor", True))
    assert torch.equal(lin.parametrizations.weight.original, before)


def test_pq_proxy_noise_drops_blocks_and_rescales_survivors() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    pm = PQNoise(w, p=0.2, block=8).train()
    out = pm(w)
    dropped = out == 0
    assert 0.1 < float(dropped.float().mean()) < 0.3
    assert torch.allclose(out[~dropped], w[~dropped] / 0.8)
    assert torch.equal(pm.eval()(w), w)


def test_kmeans_reseeds_empty_clusters() -> None:
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2)])  # two points, four centroids
    c, a = ipq.kmeans(x, 4, seed=0)
    assert len(torch.unique(a)) >= 2
    assert c.shape == (4, 2)
    assert torch.isfinite(c).all()


def test_ipq_size_model_matches_the_stored_bytes() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    pm = ipq.PQWeight(lin.weight, k=16, block=8)
    enc, bits, blob = pm.encode_weight(lin.weight)
    assert (enc, bits) == ("pq", 4)
    assert len(blob) * 8 == ipq.size_bits(lin.weight.numel(), 16, 8)
    # centroids are trainable; assignments are not parameters
    assert [n for n, _ in pm.named_parameters()] == ["centroids"]


def test_ipq_stages_run_by_layer_type_with_finetuning_between() -> None:
    model = digits_cnn(width=8)
    names = [i.name for i in compressible_layers(model)]
    calls: list[int] = []

    def finetune(m: nn.Module) -> None:
        calls.append(sum(isinstance(p, ipq.PQWeight) for p in m.modules()))

    assert ipq.staged(model, names, k=8, block=4, finetune=finetune) == ["linear", "conv2d"]
    assert calls == [1, len(names)]  # the linear stage first, then every conv as well


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_mx_fp_grids_match_the_ocp_formats(bits: int) -> None:
    grid = blockfmt.fp_grid(bits)
    assert float(grid[-1]) == {4: 6.0, 6: 7.5, 8: 448.0}[bits]
    assert len(grid) == {4: 8, 6: 32, 8: 127}[bits]


@pytest.mark.parametrize(
    ("fmt", "element", "bits"), [("mx", "int", 4), ("mx", "fp", 4), ("bfp", "int", 5)]
)
def test_block_formats_share_one_power_of_two_scale_per_block(
    fmt: str, element: str, bits: int
) -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 128) * torch.logspace(-3, 1, 128)
    deq, e, _ = blockfmt.block_quant(w, fmt, bits, element)
    block = blockfmt.BLOCK[fmt]
    assert e.numel() == 4 * 128 // block
    scales = torch.exp2(e.float()).repeat_interleave(block).reshape(4, 128)
    v = deq / scales
    if element == "int":
        assert torch.equal(v, torch.round(v))  # integer multiples of the shared scale
    rel = float((deq - w).norm() / w.norm())
    assert rel < 0.5


def test_sparsity_then_quantization_keeps_the_scale() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    for order in ("sq", "qs"):
        pm = blockfmt.BlockFormatWeight(w, fmt="mx", bits=4, sparsity=0.5, order=order)
        assert int((pm.mask == 0).sum()) == w.numel() // 2  # exact k in both orders
    sq = blockfmt.BlockFormatWeight(w, fmt="mx", bits=4, sparsity=0.5, order="sq").eval()(w)
    assert int((sq == 0).sum()) >= w.numel() // 2


def test_geta_bits_and_step_are_inverse() -> None:
    for b in range(2, 17):
        d = geta.d_of_b(0.7, b)
        assert abs(float(geta.b_of_d(0.7, d)) - b) < 1e-4


def test_geta_keeps_bits_in_range_and_hits_the_group_target() -> None:
    torch.manual_seed(0)
    model = digits_mlp(hidden=32)
    names = [i.name for i in compressible_layers(model)]
    cfg = GetaSettings(
        target_group_sparsity=0.4,
        bit_low=3,
        bit_high=6,
        warmup_steps=3,
        projection_steps=8,
        projection_periods=4,
        joint_steps=9,
        pruning_periods=3,
        cooldown_steps=4,
    )
    quantizers = geta.attach(model, names)
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trace = geta.train(model, loader, quantizers, cfg, torch.device("cpu"))
    assert len(trace.steps) == 24
    for s in trace.steps:
        if s["stage"] == "warmup":
            continue
        for b in s["bits"].values():
            assert cfg.bit_low - 1e-3 <= b <= s["b_high"] + 1e-3, s
    assert trace.target_groups == round(0.4 * 64)  # two hidden layers of 32 channels
    assert trace.pruned_groups == trace.target_groups
    for gq in quantizers.values():
        assert gq.pinned_bits is not None
        assert cfg.bit_low <= gq.pinned_bits <= cfg.bit_high
        assert torch.allclose(gq.d, geta.d_of_b(gq.qm_t(), gq.pinned_bits))  # d = d(b)
        w = model.get_submodule(gq.layer).weight
        assert int((w.abs().sum(1) == 0).sum()) == int((gq.group_mask == 0).sum())


def test_bops_of_a_known_model() -> None:
    model = digits_mlp(hidden=16, depth=1)  # 64*16 + 16*10 MACs
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.0) for i in compressible_layers(model)}
    policy = Policy(layers=layers, act_bits=8)
    quant.apply(model, policy)
    quant.actquant.calibrate(model, [torch.rand(4, 1, 8, 8)], torch.device("cpu"))
    b = quant.count_bops(model, torch.rand(1, 1, 8, 8))
    assert b.macs == 64 * 16 + 16 * 10
    assert b.bops == b.macs * 4 * 8
    assert b.relative == pytest.approx(4 * 8 / 32 / 32)
    conv = digits_cnn(width=4)
    assert quant.count_bops(conv, torch.rand(1, 1, 8, 8)).relative == 1.0


def test_activation_ranges_calibrate_then_learn() -> None:
    torch.manual_seed(0)
    model = digits_mlp(hidden=16)
    layers = {i.name: LayerPolicy(bits=32, sparsity=0.0) for i in compressible_layers(model)}
    quant.apply(model, Policy(layers=layers, act_bits=4, act_range="learned"))
    x = torch.rand(32, 1, 8, 8)
    quant.actquant.calibrate(model, [x], torch.device("cpu"))
    aq = model.get_submodule("1").act_quant
    assert float(aq.lo) == pytest.approx(float(x.min()))
    assert float(aq.hi) == pytest.approx(float(x.max()))
    assert isinstance(aq.hi, nn.Parameter)
    out = aq(torch.linspace(-1, 2, 100))
    assert len(torch.unique(out)) <= 16
    model(x).sum().backward()
    assert aq.hi.grad is not None


@pytest.mark.parametrize("shape", [(64, 32), (16, 8, 1, 1), (16, 8, 3, 3)])
def test_in_place_block_noise_matches_the_block_definition(shape: tuple[int, ...]) -> None:
    from workers.compress.quant.quant_noise import mask_noise_

    torch.manual_seed(0)
    noise = torch.randn(*shape)
    out = mask_noise_(noise.clone(), 0.4, 4)
    kept = out != 0
    if len(shape) == 2 or shape[2:] == (1, 1):
        grouped = kept.reshape(shape[0], shape[1] // 4, 4, -1)
        assert bool((grouped.all(dim=2) | (~grouped).all(dim=2)).all())
    assert 0.3 < float(kept.float().mean()) < 0.5
    assert torch.equal(out[kept], noise[kept])


def test_geta_analytic_gradients_match_autograd() -> None:
    from workers.compress.quant._common import ste_round
    from workers.compress.quant.geta import _GetaQ

    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    d = torch.tensor(0.05, requires_grad=True)
    qm = torch.tensor(1.2, requires_grad=True)
    t = torch.tensor(1.1, requires_grad=True)
    g = torch.randn(6, 5)
    (_GetaQ.apply(w, d, qm, t) * g).sum().backward()
    grads = [x.grad.clone() for x in (w, d, qm, t)]  # type: ignore[union-attr]
    for x in (w, d, qm, t):
        x.grad = None
    u = torch.minimum(w.detach().abs(), qm) ** t
    q = torch.sign(w.detach()) * d * ste_round(u / d)
    xc = torch.maximum(torch.minimum(w, qm.detach()), -qm.detach())
    ((q + (xc - xc.detach())) * g).sum().backward()
    for mine, ref in zip(grads, (w.grad, d.grad, qm.grad, t.grad), strict=True):
        assert torch.allclose(mine, ref, atol=1e-5), (mine, ref)


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("quant_noise", {"granularity": "tensor", "symmetric": False}),
        ("mx", {"mx_element": "fp"}),
        ("bfp", {}),
    ],
)
def test_embeddings_are_quantized_and_decode_exactly(method: str, kw: dict[str, object]) -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.out = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(x).mean(1))

    torch.manual_seed(0)
    model = Tiny()
    kinds = {i.name: i.kind for i in compressible_layers(model)}
    assert kinds == {"emb": "embedding", "out": "linear"}
    layers = {n: LayerPolicy(bits=4, sparsity=0.25) for n in kinds}
    quant.apply(model, Policy(layers=layers, method=method, act_bits=8, **kw))  # type: ignore[arg-type]
    assert not hasattr(model.emb, "act_quant")  # indices are not quantized
    quant.actquant.calibrate(model, [torch.randint(0, 20, (8, 5))], torch.device("cpu"))
    model(torch.randint(0, 20, (8, 5))).sum().backward()
    model.eval()
    pm = parametrize_of(model.emb)
    enc, bits, blob = pm.encode_weight(model.emb.parametrizations.weight.original)
    decoded = quant.DECODERS[enc](list(model.emb.weight.shape), bits, blob)
    assert torch.equal(decoded, model.emb.weight)
    assert len(torch.unique(decoded)) <= 4 * 16 * 2  # far fewer levels than weights


def parametrize_of(module: nn.Module) -> quant.WeightQuantizer:
    from workers.compress.quant._common import parametrization

    pm = parametrization(module)
    assert isinstance(pm, quant.WeightQuantizer)
    return pm
