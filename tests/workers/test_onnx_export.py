"""ONNX export: int8 QDQ models that run in onnxruntime and match torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from search_spaces import LayerPolicy, Policy
from service.spec import ModelSpec
from workers.codec.bits import qmax
from workers.compress.engine import compressible_layers
from workers.compress.pruning import analyze, prune_channels
from workers.compress.quant import apply as apply_policy
from workers.jobs import checkpoint as ckpt
from workers.jobs.onnx_export import ACTIVATION_TOLERANCE, WEIGHT_TOLERANCE, export_qdq
from workers.zoo.models import build_model


def _checkpoint(label: str, bits: list[int], x: torch.Tensor) -> ckpt.Checkpoint:
    torch.manual_seed(0)
    spec = ModelSpec(entrypoint=label) if ":" in label else ModelSpec(builtin=label)
    model = build_model(spec)
    report = analyze(model, x[:1])
    record = prune_channels(model, {g.name: 0.25 for g in report.groups}, x[:1], report=report)
    layers = {
        info.name: LayerPolicy(bits=bits[i % len(bits)], sparsity=0.5)
        for i, info in enumerate(compressible_layers(model))
    }
    policy = Policy(layers=layers)
    apply_policy(model, policy).eval()
    data = ckpt.encode(model, model_spec=spec, policy=policy, pruning=record, example=x[:1])
    return ckpt.decode(data, allow_modules=("tests.nets",))


@pytest.mark.parametrize(
    ("label", "x"),
    [
        ("digits-cnn", torch.rand(32, 1, 8, 8)),
        ("tests.nets:tiny_transformer", torch.rand(32, 1, 8, 8)),
        ("char-lm", torch.randint(0, 128, (8, 64))),
    ],
)
def test_qdq_export_matches_torch(label: str, x: torch.Tensor, tmp_path: Path) -> None:
    ck = _checkpoint(label, [8, 4, 3], x)
    weights_only = export_qdq(ck, tmp_path / "w.onnx", x, activations=False)
    assert weights_only.rel_diff <= WEIGHT_TOLERANCE
    assert weights_only.quantized_weights == len(ck.policy.layers)  # type: ignore[union-attr]
    full = export_qdq(ck, tmp_path / "m.onnx", x)
    assert full.quantized_activations > 0
    assert full.rel_diff <= ACTIVATION_TOLERANCE
    assert full.rel_diff_optimized >= 0.0  # measured; the runtime's fused kernels vary
    assert (tmp_path / "m.onnx").stat().st_size == full.size_bytes


def test_sub_8_bit_weights_are_int8_codes_in_the_clipped_range(tmp_path: Path) -> None:
    x = torch.rand(16, 1, 8, 8)
    ck = _checkpoint("digits-mlp", [3, 2, 5], x)
    export_qdq(ck, tmp_path / "m.onnx", x)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    codes = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    bits = {n: lp.bits for n, lp in ck.policy.layers.items()}  # type: ignore[union-attr]
    found = []
    for layer, b in bits.items():
        q = codes[f"{layer}.weight_q"]
        assert q.dtype == np.int8
        assert int(np.abs(q).max()) <= qmax(b)
        found.append(int(np.abs(q).max()) == qmax(b))
    assert any(found)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
