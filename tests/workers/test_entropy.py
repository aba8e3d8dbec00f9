"""Entropy-coded int-N codes (``workers/codec/entropy.py``; encodings ``qe``/``qsre``/
``qnme``): exact round trips, the choice for a realistic weight, refusals of damaged
blobs, the information bound against the bytes, and files written before it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers.codec import entropy, tensors
from workers.codec import sparse_codec as sc
from workers.codec.bits import qmax
from workers.errors import CheckpointError
from workers.jobs import _ckpt_safety as safety
from workers.jobs import checkpoint as ckpt

FIXTURES = Path(__file__).parent / "quant" / "fixtures"


def _codes(kind: str, n: int, bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = 1 << bits
    if kind == "uniform":
        return rng.integers(0, hi, n).astype(np.uint8)
    if kind == "skewed":
        return np.clip(np.round(rng.normal(hi / 2, hi / 10, n)), 0, hi - 1).astype(np.uint8)
    return np.full(n, hi - 1, dtype=np.uint8)  # one symbol


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("kind", ["uniform", "skewed", "single"])
@pytest.mark.parametrize("n", [0, 1, 2, 9, 5000])
def test_round_trip_is_exact(bits: int, kind: str, n: int) -> None:
    codes = _codes(kind, n, bits)
    blob = entropy.encode(codes, bits)
    back = entropy.decode(blob, n, bits)
    assert back.dtype == np.uint8
    assert np.array_equal(back, codes)
    if n == 5000:  # within a header of the order-0 entropy
        head = (1 << bits) // 8 + 3 * (1 << bits) + 4
        assert 8 * len(blob) <= entropy.entropy_bits(codes) + 8 * head + 64


def test_a_single_symbol_costs_no_stream() -> None:
    codes = np.full(1 << 20, 3, dtype=np.uint8)
    assert len(entropy.encode(codes, 2)) == 2  # bitmap byte + stream length 0


def test_codes_outside_the_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        entropy.encode(np.array([8], dtype=np.uint8), 3)


def test_every_truncation_and_appended_byte_raises_checkpoint_error() -> None:
    codes = _codes("skewed", 3000, 4)
    blob = entropy.encode(codes, 4)
    for cut in range(len(blob)):
        with pytest.raises(CheckpointError, match="entropy-coded codes"):
            entropy.decode(blob[:cut], codes.size, 4)
    with pytest.raises(CheckpointError, match="after the stream"):
        entropy.decode(blob + b"\x00", codes.size, 4)
    with pytest.raises(CheckpointError):
        entropy.decode(blob, codes.size + 1, 4)  # counts that do not add up


def test_bit_flips_raise_checkpoint_error_or_decode() -> None:
    codes = _codes("skewed", 3000, 4)
    blob = entropy.encode(codes, 4)
    rng = np.random.default_rng(1)
    caught = 0
    for _ in range(300):
        bad = bytearray(blob)
        bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        try:
            entropy.decode(bytes(bad), codes.size, 4)
        except CheckpointError:
            caught += 1
    assert caught >= 290  # the end state and the counts catch nearly every one


def test_lying_heads_are_refused_by_the_byte_check_before_decoding() -> None:
    codes = _codes("skewed", 1000, 4)
    scales = b"\x00\x3c" * 10
    for blob in (
        b"\xff\xff" + b"\xff" * 9,  # a count that never ends
        b"\x01\x00\x05" + b"\x01" * 5,  # one symbol, but a stream
        b"\x03\x00\x00\x05" + b"\x01" * 5,  # two symbols, a count of 0
        b"\x03\x00\xe9\x07\x05" + b"\x01" * 5,  # a count of 1001 > 1000
        b"\x03\x00\x07\x00",  # two symbols, no stream
        entropy.encode(codes, 4)[:-1],
    ):
        with pytest.raises(CheckpointError):
            safety.check_tensor_bytes(["w", [10, 100], "qe", 4, 0], scales + blob)


def _gaussian_codes(shape: tuple[int, int], bits: int, sparsity: float = 0.0) -> tuple:
    """Per-row symmetric max-abs int-N codes of a Gaussian weight (as a trained layer's)."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    if sparsity:
        w = w * (torch.rand(shape) >= sparsity)
    scale = (w.abs().amax(1) / qmax(bits)).half().float()
    codes = torch.round(w / scale[:, None]).clamp(-qmax(bits), qmax(bits)).to(torch.int8)
    return codes, scale


@pytest.mark.parametrize(
    ("bits", "sparsity", "most"),
    [(4, 0.0, 0.8), (3, 0.0, 0.74), (8, 0.0, 0.92), (4, 0.5, 0.86), (4, 0.95, 0.95)],
)
def test_a_large_gaussian_weight_is_entropy_coded_and_decodes_exactly(
    bits: int, sparsity: float, most: float
) -> None:
    """A 384x1536 layer (MiniLM's FFN): ``qe``, at most ``most`` times the smallest
    packed form (measured: 0.776, 0.712, 0.903, 0.836, 0.935)."""
    codes, scale = _gaussian_codes((384, 1536), bits, sparsity)
    enc, blob = tensors.encode_int_channel(codes, scale, bits)
    assert enc == "qe"
    options = tensors.int_channel_options(codes, bits, "unstructured")
    packed = min(len(options[e]) for e in ("q", "qs", "qsr") if e in options)
    assert len(blob) - 2 * 384 <= most * packed
    row = ["w", [384, 1536], enc, bits, len(blob)]
    safety.check_tensor_bytes(row, blob)
    q, back_scale = tensors.int_channel_codes([384, 1536], enc, bits, blob)
    assert torch.equal(q, codes.to(torch.int16))
    assert torch.equal(back_scale, scale)
    want_w = codes.float() * scale[:, None]
    assert torch.equal(tensors.decode_tensor(row, blob), want_w)


@pytest.mark.parametrize("enc", ["qe", "qsre", "qnme"])
def test_each_entropy_encoding_round_trips_through_the_checks(enc: str) -> None:
    from workers.compress.sparsity import nm_mask

    codes, scale = _gaussian_codes((64, 256), 4)
    kind = "unstructured"
    if enc != "qe":
        codes = codes * nm_mask(codes.float(), 2, 4).to(torch.int8)
        kind = "2:4" if enc == "qnme" else kind
    blob = scale.half().numpy().tobytes() + tensors.int_channel_options(codes, 4, kind)[enc]
    row = ["w", [64, 256], enc, 4, len(blob)]
    safety.check_tensor_bytes(row, blob)
    assert torch.equal(tensors.int_channel_codes([64, 256], enc, 4, blob)[0], codes.short())
    with pytest.raises(CheckpointError):
        tensors.decode_tensor(row, blob[:-1])


@pytest.mark.parametrize(("bits", "sparsity"), [(4, 0.0), (3, 0.0), (2, 0.0), (4, 0.9)])
def test_the_bound_is_below_the_bytes_and_close_for_a_large_tensor(
    bits: int, sparsity: float
) -> None:
    codes, scale = _gaussian_codes((384, 1536), bits, sparsity)
    enc, blob = tensors.encode_int_channel(codes, scale, bits)
    bound = tensors.int_channel_bound([384, 1536], enc, bits, blob, "unstructured")
    assert bound <= 8 * len(blob) <= 1.01 * bound + 8 * 64


def test_the_bound_is_the_order_0_entropy_of_the_codes() -> None:
    codes = torch.tensor([[0, 1, 1, -1], [2, 0, 0, 1]], dtype=torch.int8)
    nonzero = np.array([1, 1, -1, 2, 1])
    h = -(3 * np.log2(3 / 5) + np.log2(1 / 5) + np.log2(1 / 5))
    want = 2 * 16 + h + sc.log2_binomial(8, 5)
    assert sc.information_bound(codes, codes.float(), 4) == pytest.approx(want)
    assert entropy.entropy_bits(nonzero) == pytest.approx(h)
    # never above the bound with `bits` per nonzero code it replaces
    assert want <= 2 * 16 + 4 * 5 + sc.log2_binomial(8, 5)


def test_a_checkpoint_written_before_entropy_coding_loads_with_its_bound() -> None:
    """``legacy_engine_int4.sparq`` (``q``/``qs``, bound column of then) decodes to the
    model it held, and its size report keeps the bound it was written with."""
    data = (FIXTURES / "legacy_engine_int4.sparq").read_bytes()
    header, _ = ckpt.read_header(data)
    assert {row[2] for row in header["tensors"]} == {"raw:float32", "qs"}
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = ckpt.decode(data).model(x)
    then = torch.from_numpy(np.load(FIXTURES / "legacy_engine_int4.out.npy"))
    torch.testing.assert_close(out, then, rtol=0, atol=1e-6)
    stored = sum(row[5] for row in header["tensors"]) / 8
    assert ckpt.size_report(data)["bound_bytes"] == pytest.approx(stored)
