"""Tensor encodings of the checkpoint container: raw tensors, float weights with their
sparsity pattern (``fs``/``fsr``) and per-channel int-N codes (``q``/``qs``/``qsr``/
``qnm``, and their entropy-coded forms ``qe``/``qsre``/``qnme``), with their information
bounds. Methods with codes of their own register a decoder (``workers.compress.quant``)
that :func:`decode_tensor` is handed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from workers.codec import entropy
from workers.codec import sparse_codec as sc
from workers.codec.bits import dequantize, pack_bits, packed_len, qmax, unpack_bits
from workers.errors import CheckpointError

Decoder = Callable[[list[int], int, bytes], torch.Tensor]

RAW_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


# the per-channel int-N encodings :func:`encode_int_channel` chooses among; the ``e``
# forms store the codes entropy coded (:mod:`workers.codec.entropy`) instead of packed
INT_CHANNEL_ENCODINGS = ("q", "qs", "qsr", "qnm", "qe", "qsre", "qnme")


def encode_int_channel(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, kind: str = "unstructured"
) -> tuple[str, bytes]:
    """The smallest of :func:`int_channel_options` for signed int-N ``codes`` (int8 in
    ``[-qmax, qmax]``) with per-output-channel fp16 ``scale``: ``(encoding, blob)``, the
    blob the scales then that option's bytes (a tie keeps the earlier, packed form:
    tiny tensors stay ``q``)."""
    options = int_channel_options(codes, bits, kind)
    enc = min(options, key=lambda e: len(options[e]))
    return enc, scale.detach().cpu().numpy().astype("<f2").tobytes() + options[enc]


def int_channel_options(codes: torch.Tensor, bits: int, kind: str) -> dict[str, bytes]:
    """Every one of :data:`INT_CHANNEL_ENCODINGS` that applies to the codes (the pattern
    ones when some code is zero, the N:M ones when they are ``kind``'s N:M), each
    without the scales, packed form before entropy-coded form."""
    codes = codes.detach().cpu()
    unsigned = (codes.numpy().astype(np.int16) + qmax(bits)).astype(np.uint8).reshape(-1)
    nonzero = codes.numpy().reshape(-1) != 0
    options = {"q": pack_bits(unsigned, bits), "qe": entropy.encode(unsigned, bits)}
    if not nonzero.all():
        kept = unsigned[nonzero]
        values = pack_bits(kept, bits)
        pattern = sc.rice_encode_pattern(nonzero)
        options["qs"] = np.packbits(nonzero, bitorder="little").tobytes() + values
        options["qsr"] = pattern + values
        options["qsre"] = pattern + entropy.encode(kept, bits)
    nm = sc.nm_of(kind)
    if nm is not None:
        parts = sc.nm_split(codes, qmax(bits), *nm)
        if parts is not None:
            head, kept = parts
            options["qnm"] = head + pack_bits(kept, bits)
            options["qnme"] = head + entropy.encode(kept, bits)
    return options


def encode_float(weight: torch.Tensor) -> tuple[str, bytes]:
    """``raw:float32``, ``fs`` or ``fsr``, whichever is smallest."""
    w = weight.detach().cpu().numpy().astype("<f4").reshape(-1)
    nonzero = w != 0
    options = [("raw:float32", w.tobytes())]
    if not nonzero.all():
        values = w[nonzero].tobytes()
        options.append(("fs", np.packbits(nonzero, bitorder="little").tobytes() + values))
        options.append(("fsr", sc.rice_encode_pattern(nonzero) + values))
    return min(options, key=lambda o: len(o[1]))


def int_channel_bound(shape: list[int], enc: str, bits: int, blob: bytes, kind: str) -> float:
    """Information bound of an :func:`encode_int_channel` tensor (scales, the codes'
    entropy and the pattern's: see :func:`workers.codec.sparse_codec.information_bound`)."""
    codes, _ = int_channel_codes(shape, enc, bits, blob)
    return sc.information_bound(codes, codes, bits, kind)


def float_bound(shape: list[int], enc: str, blob: bytes) -> float:
    """Information bound of an :func:`encode_float` tensor."""
    return sc.information_bound(None, decode_tensor(["", shape, enc, 32], blob), 32)


def decode_tensor(
    row: list[Any], blob: bytes, decoders: Mapping[str, Decoder] | None = None
) -> torch.Tensor:
    """One stored tensor as a float (or raw-typed) tensor: the container's own
    encodings, then ``decoders`` (the methods' own, by encoding name)."""
    key, shape, enc, bits = row[:4]
    n = int(np.prod(shape)) if shape else 1
    if enc.startswith("raw:"):
        dtype = RAW_DTYPES[enc[4:]]
        np_dtype = np.uint8 if dtype == torch.bool else torch.empty(0, dtype=dtype).numpy().dtype
        arr = np.frombuffer(blob, dtype=np_dtype).copy()
        return torch.from_numpy(arr).to(dtype).reshape(shape)
    if enc == "fs":
        mask_len = packed_len(n, 1)
        mask = np.unpackbits(np.frombuffer(blob[:mask_len], np.uint8), count=n, bitorder="little")
        w = np.zeros(n, dtype=np.float32)
        w[mask.astype(bool)] = np.frombuffer(blob[mask_len:], dtype="<f4")
        return torch.from_numpy(w).reshape(shape)
    if decoders and enc in decoders:
        return decoders[enc](shape, bits, blob)
    if enc == "fsr":
        mask, used = sc.rice_decode_pattern(blob, n)
        w = np.zeros(n, dtype=np.float32)
        w[mask] = np.frombuffer(blob[used:], dtype="<f4")
        return torch.from_numpy(w).reshape(shape)
    if enc not in INT_CHANNEL_ENCODINGS:
        raise CheckpointError(f"tensor {key!r} has unknown encoding {enc!r}")
    q, scale = int_channel_codes(shape, enc, bits, blob)
    return dequantize(q, scale)


def int_channel_codes(
    shape: list[int], enc: str, bits: int, blob: bytes
) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed codes (int16, ``shape``) and fp32 per-channel scales of an
    :func:`encode_int_channel` tensor."""
    n = int(np.prod(shape)) if shape else 1
    out_ch = shape[0]
    scale = torch.from_numpy(np.frombuffer(blob[: 2 * out_ch], dtype="<f2").astype(np.float32))
    rest = blob[2 * out_ch :]
    if enc in ("qnm", "qnme"):
        return sc.nm_decode(rest, shape, qmax(bits), bits, entropy_coded=enc == "qnme"), scale
    if enc == "q":
        codes = unpack_bits(rest, bits, n)
    elif enc == "qe":
        codes = entropy.decode(rest, n, bits)
    else:
        if enc == "qs":
            used = packed_len(n, 1)
            mask = np.unpackbits(np.frombuffer(rest[:used], np.uint8), count=n, bitorder="little")
            nz = mask.astype(bool)
        else:  # qsr, qsre
            nz, used = sc.rice_decode_pattern(rest, n)
        k = int(nz.sum())
        codes = np.full(n, qmax(bits), dtype=np.uint8)
        if enc == "qsre":
            codes[nz] = entropy.decode(rest[used:], k, bits)
        else:
            codes[nz] = unpack_bits(rest[used:], bits, k)
    q = torch.from_numpy(codes.astype(np.int16) - qmax(bits)).reshape(shape)
    return q, scale
