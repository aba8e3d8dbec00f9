"""Tensor encodings of the checkpoint container: raw tensors, float weights with their
sparsity pattern (``fs``/``fsr``) and per-channel int-N codes (``q``/``qs``/``qsr``/
``qnm``), with their information bounds. Methods with codes of their own register a
decoder (``workers.compress.quant``) that :func:`decode_tensor` is handed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

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


def encode_int_channel(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, kind: str = "unstructured"
) -> tuple[str, bytes]:
    """``q``, ``qs``, ``qsr`` or ``qnm``, whichever is smallest: signed int-N ``codes``
    (int8 in ``[-qmax, qmax]``) with per-output-channel fp16 ``scale``."""
    codes = codes.detach().cpu()
    unsigned = (codes.numpy().astype(np.int16) + qmax(bits)).astype(np.uint8).reshape(-1)
    scales = scale.detach().cpu().numpy().astype("<f2").tobytes()
    nonzero = codes.numpy().reshape(-1) != 0
    options = [("q", pack_bits(unsigned, bits))]
    if not nonzero.all():
        values = pack_bits(unsigned[nonzero], bits)
        options.append(("qs", np.packbits(nonzero, bitorder="little").tobytes() + values))
        options.append(("qsr", sc.rice_encode_pattern(nonzero) + values))
    nm = sc.nm_of(kind)
    if nm is not None:
        blob = sc.nm_encode(codes, qmax(bits), bits, *nm)
        if blob is not None:
            options.append(("qnm", blob))
    enc, blob = min(options, key=lambda o: len(o[1]))
    return enc, scales + blob


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
    """Information bound of an :func:`encode_int_channel` tensor (it depends only on
    which codes are nonzero: see :func:`workers.codec.sparse_codec.information_bound`)."""
    nonzero = (decode_tensor(["", shape, enc, bits], blob) != 0).to(torch.int16)
    return sc.information_bound(nonzero, nonzero, bits, kind)


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
    if enc not in ("q", "qs", "qsr", "qnm"):
        raise CheckpointError(f"tensor {key!r} has unknown encoding {enc!r}")
    out_ch = shape[0]
    scale = torch.from_numpy(np.frombuffer(blob[: 2 * out_ch], dtype="<f2").astype(np.float32))
    rest = blob[2 * out_ch :]
    if enc == "q":
        codes = unpack_bits(rest, bits, n)
    elif enc == "qnm":
        q = sc.nm_decode(rest, shape, qmax(bits), bits)
        return dequantize(q, scale)
    elif enc == "qsr":
        nz, used = sc.rice_decode_pattern(rest, n)
        codes = np.full(n, qmax(bits), dtype=np.uint8)
        codes[nz] = unpack_bits(rest[used:], bits, int(nz.sum()))
    else:
        mask_len = packed_len(n, 1)
        nz = np.unpackbits(np.frombuffer(rest[:mask_len], np.uint8), count=n, bitorder="little")
        nz = nz.astype(bool)
        codes = np.full(n, qmax(bits), dtype=np.uint8)
        codes[nz] = unpack_bits(rest[mask_len:], bits, int(nz.sum()))
    q = torch.from_numpy(codes.astype(np.int16) - qmax(bits)).reshape(shape)
    return dequantize(q, scale)
