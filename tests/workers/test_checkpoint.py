from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from search_spaces import LayerPolicy, Policy
from service.spec import DatasetSpec, ModelSpec
from workers.codec import bits as codec_bits
from workers.compress.engine import compressible_layers
from workers.compress.quant import apply as apply_policy
from workers.errors import CheckpointError
from workers.jobs import checkpoint as ckpt
from workers.zoo.models import build_model


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_pack_bits_round_trip_and_exact_length(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, size=n, dtype=np.uint8)
    buf = codec_bits.pack_bits(codes, bits)
    assert len(buf) == (n * bits + 7) // 8
    assert np.array_equal(codec_bits.unpack_bits(buf, bits, n), codes)


def test_pack_bits_refuses_codes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        codec_bits.pack_bits(np.array([8], dtype=np.uint8), 3)


def _compressed(name: str, bits: int, sparsity: float) -> tuple[torch.nn.Module, ModelSpec, Policy]:
    torch.manual_seed(0)
    spec = ModelSpec(builtin=name)
    model = build_model(spec)
    layers = {i.name: LayerPolicy(bits=bits, sparsity=sparsity) for i in compressible_layers(model)}
    policy = Policy(layers=layers, noise_rate=0.5, noise_block=1)
    return apply_policy(model, policy).eval(), spec, policy


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
@pytest.mark.parametrize(("bits", "sparsity"), [(8, 0.0), (4, 0.5), (3, 0.8), (2, 0.9), (32, 0.7)])
def test_reload_reproduces_outputs_exactly(name: str, bits: int, sparsity: float) -> None:
    model, spec, policy = _compressed(name, bits, sparsity)
    data = ckpt.encode(
        model, model_spec=spec, dataset_spec=DatasetSpec(builtin="digits"), policy=policy
    )
    loaded = ckpt.decode(data)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.policy == policy
    assert loaded.size_bytes == len(data)


def test_size_is_the_file_size_and_shrinks_with_bits_and_sparsity(tmp_path: Path) -> None:
    sizes = {}
    for bits, sparsity in [(32, 0.0), (8, 0.0), (4, 0.0), (4, 0.75), (2, 0.9)]:
        model, spec, policy = _compressed("digits-mlp", bits, sparsity)
        data = ckpt.encode(model, model_spec=spec, policy=policy)
        path = ckpt.save(tmp_path / f"{bits}-{sparsity}.sparq", data)
        assert path.stat().st_size == len(data)
        sizes[(bits, sparsity)] = len(data)
    float_bytes = 4 * sum(
        p.numel() for p in build_model(ModelSpec(builtin="digits-mlp")).parameters()
    )
    assert sizes[(32, 0.0)] >= float_bytes
    assert sizes[(8, 0.0)] < sizes[(32, 0.0)] / 3.8  # biases stay fp32
    assert sizes[(4, 0.0)] < sizes[(8, 0.0)] / 1.9
    # 75% sparse at 4 bits: a 1-bit mask + 0.25 * 4 bits = 2 bits a weight, not 4
    assert sizes[(4, 0.75)] < sizes[(4, 0.0)] / 1.8
    assert sizes[(2, 0.9)] < sizes[(32, 0.0)] / 20  # 1.2 bits a weight, plus fp32 biases


def test_truncated_or_foreign_files_raise_checkpoint_error() -> None:
    model, spec, policy = _compressed("digits-mlp", 4, 0.5)
    data = ckpt.encode(model, model_spec=spec, policy=policy)
    with pytest.raises(CheckpointError, match="header says"):
        ckpt.decode(data[:-1])
    with pytest.raises(CheckpointError, match="magic"):
        ckpt.decode(b"PK\x03\x04" + data[4:])
    with pytest.raises(CheckpointError, match="too short"):
        ckpt.decode(b"SP")


def test_loading_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    model, spec, policy = _compressed("digits-cnn", 4, 0.5)
    data = ckpt.encode(model, model_spec=spec, policy=policy)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(builtins, "eval", refuse)
    assert ckpt.decode(data).policy == policy
