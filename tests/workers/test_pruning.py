"""Structured pruning through the dependency graph, on networks sparq has no code for."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from service.spec import ModelSpec
from tests import nets
from workers.compress.pruning import analyze, count_params, prune_channels, replay
from workers.zoo.models import build_model

CASES = [f"tests.nets:{n}" for n in nets.GENERALITY] + ["digits-dsconv", "digits-transformer"]


def _build(label: str) -> tuple[nn.Module, torch.Tensor]:
    spec = ModelSpec(entrypoint=label) if ":" in label else ModelSpec(builtin=label)
    torch.manual_seed(0)
    return build_model(spec), torch.rand(1, 1, 8, 8)


@pytest.mark.slow
@pytest.mark.parametrize("label", CASES)
def test_groups_prune_to_a_physically_smaller_model_that_replays(label: str) -> None:
    model, x = _build(label)
    fresh = copy.deepcopy(model)
    report = analyze(model, x)
    assert report.groups, report.dense
    # the classifier's outputs are the network's: always left dense, with the reason
    assert any("output shape" in why for why in report.dense.values())
    before = count_params(model)
    record = prune_channels(model, {g.name: 0.5 for g in report.groups}, x)
    assert count_params(model) < before
    # every group wider than one pruning step lost channels
    wide = {g.name for g in report.groups if g.channels > 4 * g.heads}
    assert wide <= {r["group"] for r in record} <= {g.name for g in report.groups}
    model.eval()
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    replay(fresh, record, x)
    fresh.eval()
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_channel_counts_are_exact(fraction: float) -> None:
    model, x = _build("tests.nets:residual_cnn")
    report = analyze(model, x)
    widths = {g.name: g.channels for g in report.groups}
    record = prune_channels(model, {"down": fraction}, x)
    assert [r["group"] for r in record] == ["down"]
    removed = len(record[0]["idxs"])
    assert removed == (round(fraction * widths["down"]) // 4) * 4  # multiples of 4 (N:M)
    assert model.down.out_channels == widths["down"] - removed
    assert model.fc.in_features == widths["down"] - removed


def test_residual_stream_is_one_group_and_stays_consistent() -> None:
    model, x = _build("tests.nets:residual_cnn")
    stream = next(g for g in analyze(model, x).groups if g.name == "stem")
    assert {"stem", "block1.b", "block2.b"} <= set(stream.layers)
    prune_channels(model, {"stem": 0.5}, x)
    assert model.stem.out_channels == model.block1.b.out_channels == model.block2.b.out_channels
    assert model.block1.bn_b.num_features == model.stem.out_channels


def test_concatenation_maps_channels_to_the_consumer() -> None:
    model, x = _build("tests.nets:concat_cnn")
    prune_channels(model, {"right": 0.5, "stem": 0.5}, x)
    want = model.stem.out_channels + model.left.out_channels + model.right.out_channels
    assert model.mix.in_channels == model.bn.num_features == want


def test_attention_heads_keep_equal_widths() -> None:
    model, x = _build("tests.nets:tiny_transformer")
    report = analyze(model, x)
    stream = next(g for g in report.groups if g.heads > 1)
    assert stream.heads == 4
    assert "attn.out_proj" in stream.layers
    record = prune_channels(model, {stream.name: 0.5}, x)
    idxs = record[0]["idxs"]
    width = stream.channels // 4
    per_head = [sum(h * width <= i < (h + 1) * width for i in idxs) for h in range(4)]
    assert len(set(per_head)) == 1
    assert model.attn.embed_dim == stream.channels - len(idxs)
    assert model.attn.embed_dim % model.attn.num_heads == 0
    model.eval()
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_depthwise_convolution_is_pruned_with_its_producer() -> None:
    model, x = _build("tests.nets:dsconv_net")
    prune_channels(model, {"pw1": 0.5}, x)
    assert model.dw2.in_channels == model.dw2.out_channels == model.dw2.groups
    assert model.dw2.groups == model.pw1.out_channels


def test_unknown_group_names_the_prunable_ones() -> None:
    model, x = _build("tests.nets:se_cnn")
    with pytest.raises(ValueError, match=r"not prunable groups.*prunable groups: \["):
        prune_channels(model, {"fc": 0.5}, x)


def test_untraceable_network_is_reported_dense_not_a_crash() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 8)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": self.a(x.flatten(1))}

    report = analyze(Odd(), torch.rand(1, 1, 8, 8))
    assert report.groups == []
    assert "a" in report.dense


def test_the_report_feeds_the_knob_space() -> None:
    """The driver passes the report's groups to the search space as they are."""
    from search_spaces import KnobSpace, to_optuna
    from workers.compress.engine import compressible_layers

    model, x = _build("tests.nets:tiny_transformer")
    report = analyze(model, x).as_dict()
    space = KnobSpace.model_validate(
        {
            "layers": [i.model_dump() for i in compressible_layers(model)],
            "weight_bits": [4, 8],
            "sparsity_low": 0.0,
            "sparsity_high": 0.5,
            "noise_rate_low": 0.5,
            "noise_rate_high": 1.0,
            "noise_block": 4,
            "sparsity_kinds": ["unstructured", "channel"],
            "groups": report["groups"],
            "channel_low": 0.1,
            "channel_high": 0.5,
        }
    )
    assert {g.heads for g in space.groups} == {1, 4}
    # the residual stream is one group, named by its first layer (the token embedding)
    assert "group:tok.channels" in to_optuna(space)


def test_quantizers_follow_the_surviving_channels() -> None:
    """Pruning first, quantizers after: masks and per-channel scales have the pruned
    shapes (no sliced or stale quantizer state)."""
    from search_spaces import LayerPolicy, Policy
    from workers.codec.bits import dequantize
    from workers.compress.engine import compressible_layers, quantize
    from workers.compress.quant import apply as apply_policy

    model, x = _build("tests.nets:se_cnn")
    prune_channels(model, {"conv1": 0.5, "conv2": 0.5}, x)
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.3) for i in compressible_layers(model)}
    apply_policy(model, Policy(layers=layers)).eval()
    for name in layers:
        module = model.get_submodule(name)
        original = module.parametrizations.weight.original
        mask = module.parametrizations.weight[0].mask
        assert mask.shape == original.shape
        codes, scale = quantize(original * mask, 4)
        assert scale.shape == (original.shape[0],)
        assert torch.equal(module.weight, dequantize(codes, scale))
    assert model.conv1.parametrizations.weight.original.shape[0] == 8


class _EmbeddingStream(nn.Module):
    """Token embedding (vocabulary 18, width 32) feeding a residual MLP and a head:
    the embedding leads the group of the width, as in a BERT or GPT-2."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(18, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


def test_an_embedding_group_counts_its_width_not_its_vocabulary() -> None:
    """An Embedding's channels are its embedding_dim (the weight's columns): the group
    it leads has 32 channels, not 18 (the vocabulary), and a fraction of it removes a
    multiple of 4 of the width, so the layers it feeds keep a fan-in N:M tiles."""
    torch.manual_seed(0)
    model, ids = _EmbeddingStream(), torch.randint(0, 18, (1, 12))
    fresh = copy.deepcopy(model)
    stream = next(g for g in analyze(model, ids).groups if g.name == "emb")
    assert stream.channels == 32
    assert {"emb", "fc2"} <= set(stream.layers)
    record = prune_channels(model, {"emb": 0.3}, ids)
    assert len(record[0]["idxs"]) == (round(0.3 * 32) // 4) * 4 == 8
    assert max(record[0]["idxs"]) < 32
    assert model.emb.weight.shape == (18, 24)
    assert model.fc1.in_features == model.head.in_features == 24
    replay(fresh, record, ids)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
