"""Checkpoints written before int-N Quant-Noise was one class still load.

The fixtures were written by the code of commit b06a056 (``digits_mlp(hidden=8)``,
int-4, sparsity 0.5, seed 0): ``legacy_engine_int4.sparq`` by the engine's own
``QuantNoise`` (encodings ``q``/``qs``), ``legacy_qx_int4.sparq`` by
``ScalarQuantNoise`` per tensor, affine (``qx``); ``*.out.npy`` are the outputs the
loaded models gave then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from search_spaces import LayerPolicy, Policy
from service.spec import ModelSpec
from workers.codec.tensors import INT_CHANNEL_ENCODINGS, int_channel_bound
from workers.compress import quant
from workers.compress.engine import compressible_layers
from workers.jobs import checkpoint as ckpt
from workers.zoo.models import digits_mlp

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [("engine", {}, "qs"), ("qx", {"symmetric": False, "granularity": "tensor"}, "qx")]


def _x() -> torch.Tensor:
    return torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(("name", "kw", "enc"), CASES, ids=[c[0] for c in CASES])
def test_old_checkpoints_load_and_match_the_one_class(
    name: str, kw: dict[str, Any], enc: str
) -> None:
    data = (FIXTURES / f"legacy_{name}_int4.sparq").read_bytes()
    header, _ = ckpt.read_header(data)
    assert {row[2] for row in header["tensors"]} == {"raw:float32", enc}
    loaded = ckpt.decode(data).model
    with torch.no_grad():
        out = loaded(_x())
    then = torch.from_numpy(np.load(FIXTURES / f"legacy_{name}_int4.out.npy"))
    # exact in one process; against the outputs saved then, up to the float summation
    # order of another thread count (a full suite leaves torch's threads set otherwise)
    torch.testing.assert_close(out, then, rtol=0, atol=1e-6)
    # the same policy wrapped today gives the same eval outputs and no larger file
    torch.manual_seed(0)
    model = digits_mlp(hidden=8)
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.5) for i in compressible_layers(model)}
    policy = Policy(layers=layers, noise_rate=0.5, **kw)
    quant.apply(model, policy).eval()
    with torch.no_grad():
        assert torch.equal(model(_x()), out)
    now = ckpt.encode(
        model, model_spec=ModelSpec(builtin="digits-mlp", kwargs={"hidden": 8}), policy=policy
    )
    assert len(now) <= len(data)
    # the same codes: the bounds the new file stores are today's bounds of the old
    # file's tensors (the int-N bound is the codes' entropy now, below b06a056's)
    assert _bounds(now) == pytest.approx(_bounds(data, recompute=True), abs=0.01)
    assert ckpt.size_report(now)["bound_bytes"] <= ckpt.size_report(data)["bound_bytes"]


def _bounds(data: bytes, recompute: bool = False) -> dict[str, float]:
    """Each tensor's stored bound in bits, or (``recompute``) today's bound of its
    bytes (the int-N encodings; other tensors keep their stored bound)."""
    header, off = ckpt.read_header(data)
    out = {}
    for name, shape, enc, bits, nbytes, bound in header["tensors"]:
        blob = data[off : off + nbytes]
        off += nbytes
        if recompute and enc in INT_CHANNEL_ENCODINGS:
            bound = int_channel_bound(shape, enc, bits, blob, "unstructured")
        out[name] = bound
    return out


@pytest.mark.parametrize(
    ("kw", "enc"),
    [
        ({}, "int"),
        ({"order": "qs"}, "int"),  # was qx: 5 bytes a layer smaller now
        ({"granularity": "tensor"}, "qx"),
        ({"symmetric": False}, "qx"),
    ],
)
def test_per_channel_symmetric_int_n_uses_the_checkpoint_int_encodings(
    kw: dict[str, Any], enc: str
) -> None:
    torch.manual_seed(0)
    model = digits_mlp(hidden=8)
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.5) for i in compressible_layers(model)}
    policy = Policy(layers=layers, noise_rate=0.5, **kw)
    quant.apply(model, policy).eval()
    data = ckpt.encode(
        model, model_spec=ModelSpec(builtin="digits-mlp", kwargs={"hidden": 8}), policy=policy
    )
    header, _ = ckpt.read_header(data)
    weights = {row[2] for row in header["tensors"]} - {"raw:float32"}
    # "int": the checkpoint's own per-channel encodings (whichever is smallest a layer)
    assert weights
    assert weights <= set(INT_CHANNEL_ENCODINGS) if enc == "int" else weights == {enc}
    with torch.no_grad():
        assert torch.equal(ckpt.decode(data).model(_x()), model(_x()))
