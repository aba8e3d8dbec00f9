"""The really compressed checkpoint: pruned channels absent, N:M and index-coded
patterns, exact reload (builtin or entrypoint + pruning record), size = file bytes,
and bytes on disk against the information bound."""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from search_spaces import LayerPolicy, Policy
from service.spec import ModelSpec
from workers.codec import sparse_codec as sc
from workers.compress.engine import compressible_layers
from workers.compress.pruning import analyze, count_params, prune_channels
from workers.compress.quant import apply as apply_policy
from workers.jobs import checkpoint as ckpt
from workers.zoo.models import build_model


def _compress(
    label: str, *, bits: int = 4, sparsity: float = 0.5, kind: str = "unstructured",
    channels: float = 0.5, seed: int = 0,
) -> tuple[nn.Module, bytes, int]:  # fmt: skip
    torch.manual_seed(seed)
    spec = ModelSpec(entrypoint=label) if ":" in label else ModelSpec(builtin=label)
    model = build_model(spec)
    dense_params = count_params(model)
    x = torch.rand(1, 1, 8, 8)
    report = analyze(model, x)
    record = prune_channels(model, {g.name: channels for g in report.groups}, x, report=report)
    layers = {}
    for info in compressible_layers(model):
        k = kind if kind in info.sparsity_kinds else "unstructured"
        s = {"2:4": 0.5, "1:4": 0.75}.get(k, sparsity)
        layers[info.name] = LayerPolicy(bits=bits, sparsity=s, kind=k)
    policy = Policy(layers=layers, noise_rate=0.5, noise_block=1, channels={})
    apply_policy(model, policy).eval()
    data = ckpt.encode(model, model_spec=spec, policy=policy, pruning=record, example=x)
    return model, data, dense_params


_RELOAD = [
    pytest.param(label, kind, bits, marks=[] if (label, kind) == (fast, "2:4") else [slow])
    for fast, slow in [("tests.nets:residual_cnn", pytest.mark.slow)]
    for label in ["tests.nets:residual_cnn", "tests.nets:tiny_transformer", "digits-dsconv"]
    for kind, bits in [("unstructured", 3), ("2:4", 4), ("1:4", 8)]
]


@pytest.mark.parametrize(("label", "kind", "bits"), _RELOAD)
def test_pruned_checkpoint_reloads_smaller_and_exact(label: str, kind: str, bits: int) -> None:
    model, data, dense_params = _compress(label, bits=bits, kind=kind)
    ck = ckpt.decode(data, allow_modules=("tests.nets",))
    assert ck.pruning  # the record is inside
    assert count_params(ck.model) < dense_params  # fewer parameters, not only zeros
    assert count_params(ck.model) == count_params(model)
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ck.model(x), model(x))


def test_nm_layers_use_the_packed_nm_encoding() -> None:
    _, data, _ = _compress("digits-mlp", kind="2:4", channels=0.0)
    header, _ = ckpt.read_header(data)
    encs = {row[0]: row[2] for row in header["tensors"]}
    assert encs["1.weight"] == "qnme"  # 64 -> 256: 2:4 along the 64 inputs, codes entropy coded
    row = next(r for r in header["tensors"] if r[0] == "3.weight")
    n = 256 * 256
    # 2.625 bits a group of 4 for the pattern, 2 kept 4-bit codes, fp16 scales
    expected = 2 + 2 * 256 + (n // 4 // 24 * 63 + 7) // 8 + n // 4 * 2 * 4 // 8
    assert row[4] <= expected + 8


def test_sparse_layers_code_their_pattern_near_its_entropy() -> None:
    """High sparsity: the pattern index-coded (``qsr``/``qsre``) or the codes entropy
    coded with the zeros among them (``qe``), never a bitmask; half sparse: any of
    the pattern-coding encodings."""
    _, sparse, _ = _compress("digits-mlp", sparsity=0.95, channels=0.0)
    _, half, _ = _compress("digits-mlp", sparsity=0.5, channels=0.0)
    enc = {r[0]: r[2] for r in ckpt.read_header(sparse)[0]["tensors"]}
    assert enc["3.weight"] in ("qsr", "qsre", "qe")
    enc = {r[0]: r[2] for r in ckpt.read_header(half)[0]["tensors"]}
    assert enc["3.weight"] in ("qs", "qsr", "qsre", "qe")


@pytest.mark.parametrize(
    ("kind", "sparsity", "bits"),
    [("unstructured", 0.0, 8), ("unstructured", 0.5, 4), ("unstructured", 0.9, 2),
     ("unstructured", 0.97, 3), ("2:4", 0.5, 4), ("1:4", 0.75, 2)],
)  # fmt: skip
def test_bytes_on_disk_within_ten_percent_of_the_information_bound(
    kind: str, sparsity: float, bits: int, tmp_path: Path
) -> None:
    """The demo model (digits-mlp, 256 wide): file bytes / bound <= 1.10."""
    _model, data, _ = _compress("digits-mlp", bits=bits, sparsity=sparsity, kind=kind, channels=0)
    report = ckpt.size_report(data)
    path = ckpt.save(tmp_path / "m.sparq", data)
    assert report["size_bytes"] == len(data) == path.stat().st_size  # the size equality
    assert report["bound_bytes"] < len(data)
    assert report["ratio"] <= 1.10, report


def test_information_bound_matches_its_definition() -> None:
    codes = torch.zeros(4, 8, dtype=torch.int8)
    codes[0, :3] = torch.tensor([1, -2, 3], dtype=torch.int8)
    bound = sc.information_bound(codes, codes.float(), 4)
    # fp16 scales, 3 nonzero codes of entropy log2(3) each, the pattern
    assert bound == pytest.approx(16 * 4 + 3 * np.log2(3) + sc.log2_binomial(32, 3))
    nm = torch.tensor([[1, 0, 2, 0, 0, 3, 0, 1]], dtype=torch.int8)
    # 2:4: two combination indices, kept codes 1, 2, 3, 1 (entropy 1.5 bits each)
    want = 16 + 2 * np.log2(6) + 4 * 1.5
    assert sc.information_bound(nm, nm.float(), 4, "2:4") == pytest.approx(want)
    # not N:M: the pattern of 4 among 8 and the same codes
    unstructured = 16 + sc.log2_binomial(8, 4) + 4 * 1.5
    assert sc.information_bound(nm, nm.float(), 4) == pytest.approx(unstructured)
    w = torch.tensor([0.0, 1.5, 0.0, 0.0])
    assert sc.information_bound(None, w, 32) == pytest.approx(32 + 2)


@pytest.mark.parametrize("n", [0, 1, 9, 4000])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.8, 1.0])
def test_index_coding_round_trips(n: int, density: float) -> None:
    rng = np.random.default_rng(n)
    p = rng.random(n) < density
    blob = sc.rice_encode_pattern(p)
    got, used = sc.rice_decode_pattern(blob + b"\xff\x00trailing", n)
    assert used == len(blob)
    assert np.array_equal(got, p)
    if n == 4000 and 0 < density < 1:  # close to the entropy
        assert 8 * len(blob) <= 1.1 * sc.log2_binomial(n, int(p.sum())) + 48


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4)])
@pytest.mark.parametrize("groups", [1, 23, 24, 25, 1000])
def test_nm_index_coding_round_trips(n: int, m: int, groups: int) -> None:
    from workers.compress.sparsity import nm_mask

    torch.manual_seed(groups)
    w = torch.randn(groups, m)
    codes = (torch.randint(-7, 8, (groups, m)) * nm_mask(w, n, m)).to(torch.int8)
    blob = sc.nm_encode(codes, 7, 4, n, m)
    assert blob is not None
    assert torch.equal(sc.nm_decode(blob, [groups, m], 7, 4).to(torch.int8), codes)


def test_nm_encoding_refuses_codes_that_are_not_nm() -> None:
    assert sc.nm_encode(torch.ones(2, 8, dtype=torch.int8), 7, 4, 2, 4) is None


def test_pruned_loading_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data, _ = _compress("tests.nets:concat_cnn")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(builtins, "eval", refuse)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():  # decoding under no_grad works too (the graph needs autograd)
        assert torch.equal(ckpt.decode(data, allow_modules=("tests.nets",)).model(x), model(x))


def test_a_pruned_model_needs_an_example_input() -> None:
    from workers.errors import CheckpointError

    with pytest.raises(CheckpointError, match="needs `example`"):
        ckpt.encode(
            nn.Linear(2, 2), model_spec=ModelSpec(builtin="digits-mlp"), pruning=[{"group": "x"}]
        )
