"""Compact codes for sparsity patterns, and the information bound they are measured by.

- Index coding of an unstructured pattern: the positions of the rarer symbol (nonzero
  at high sparsity, zero at low sparsity) as gaps, Golomb-Rice coded (Golomb, "Run-length
  encodings", 1966; Rice, 1979) with the parameter ``k`` that minimizes the length.
  Quotients and remainders are kept in two streams so both directions are vectorized.
  For geometric gaps this is within a few percent of the pattern's entropy, where a
  bitmask costs ``1 / H(density)`` times it (2.1x at 90% sparsity).
- N:M: the kept positions of each group of ``M`` as one index among the ``C(M, N)``
  combinations, several groups per 64-bit word in base ``C(M, N)``: 2.625 bits a 2:4
  group against the ``log2 6 = 2.585`` bound (a 2-bit index per kept weight costs 4).
- :func:`information_bound`: 16 bits per fp16 scale (32 per float), the order-0
  empirical entropy of the stored nonzero codes (times their number: what the entropy-
  coded encodings of :mod:`workers.codec.entropy` spend, up to a header; at most
  ``bits`` a code), plus the entropy of the sparsity pattern, ``log2 C(n, k)`` for ``k``
  nonzeros among ``n`` (or ``groups * log2 C(M, N)`` plus the kept codes' entropy for an
  N:M layer, whichever is smaller). Since ``n * H(all codes) = n * H2(k / n) + k *
  H(nonzero codes) >= log2 C(n, k) + k * H(nonzero codes)``, this is also below what
  entropy coding the dense codes can reach. The checkpoint's bytes are reported
  against it.
"""

from __future__ import annotations

import itertools
import math
import struct

import numpy as np
import torch

from search_spaces._policy import NM_KINDS
from workers.codec import entropy
from workers.codec.bits import from_groups, nm_groups_view, pack_bits, unpack_bits

_RICE = struct.Struct("<BBI")
_NM = struct.Struct("<BB")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def log2_binomial(n: int, k: int) -> float:
    if k < 0 or k > n:
        raise ValueError(f"log2 C(n, k) needs 0 <= k <= n, but got n={n}, k={k}")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _pack_wide(values: np.ndarray, width: int) -> bytes:
    """Pack unsigned values (< 2**width, width <= 64) LSB first, back to back."""
    if width == 0 or values.size == 0:
        return b""
    v = values.astype(np.uint64)
    planes = (v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack_wide(buf: bytes, width: int, count: int) -> np.ndarray:
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.uint64)
    bits = np.unpackbits(
        np.frombuffer(buf, dtype=np.uint8), count=count * width, bitorder="little"
    ).reshape(count, width)
    out = np.zeros(count, dtype=np.uint64)
    for j in range(width):  # plane by plane: no count x width uint64 temporary
        out |= bits[:, j].astype(np.uint64) << np.uint64(j)
    return out


def rice_encode_pattern(nonzero: np.ndarray) -> bytes:
    """Index-code a boolean pattern: ``u8 symbol | u8 k | u32 count | unary | remainders``."""
    flat = np.asarray(nonzero, dtype=bool).reshape(-1)
    symbol = 1 if int(flat.sum()) * 2 <= flat.size else 0
    pos = np.flatnonzero(flat == bool(symbol)).astype(np.int64)
    gaps = np.diff(pos, prepend=-1) - 1
    m = int(gaps.size)
    best_k, best = 0, None
    for k in range(0, 33):
        cost = int((gaps >> k).sum()) + m * (1 + k)
        if best is None or cost < best:
            best_k, best = k, cost
    k = best_k
    q = gaps >> k
    unary = np.ones(int(q.sum()) + m, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    packed_unary = np.packbits(unary, bitorder="little").tobytes()
    rem = _pack_wide((gaps & ((1 << k) - 1)).astype(np.uint64), k)
    return _RICE.pack(symbol, k, m) + packed_unary + rem


def rice_decode_pattern(buf: bytes, n: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`rice_encode_pattern`: the pattern and the bytes it used."""
    symbol, k, m = _RICE.unpack_from(buf)
    off = _RICE.size
    if m == 0:
        return np.full(n, not symbol, dtype=bool), off
    rest = np.frombuffer(buf, dtype=np.uint8, offset=off)
    # the byte holding the m-th terminator (a 0 bit): unpack only up to it
    end = int(np.searchsorted(np.cumsum(8 - _POPCOUNT[rest]), m))
    bits = np.unpackbits(rest[: end + 1], bitorder="little")
    zeros = np.flatnonzero(bits == 0)[:m]
    if zeros.size < m:
        raise ValueError("index-coded sparsity pattern is truncated")
    q = np.diff(zeros, prepend=-1) - 1
    off += (int(zeros[-1]) + 1 + 7) // 8
    rem_len = (m * k + 7) // 8
    rem = _unpack_wide(buf[off : off + rem_len], k, m).astype(np.int64)
    gaps = (q.astype(np.int64) << k) | rem
    pos = np.cumsum(gaps + 1) - 1
    if pos[-1] >= n:
        raise ValueError(f"index-coded sparsity pattern points past the tensor ({n} values)")
    out = np.full(n, not symbol, dtype=bool)
    out[pos] = bool(symbol)
    return out, off + rem_len


def nm_of(kind: str) -> tuple[int, int] | None:
    return NM_KINDS.get(kind)


def _combos(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The C(m, n) kept-position tuples and a lookup from a group's bitmask to its index."""
    combos = np.array(list(itertools.combinations(range(m), n)), dtype=np.int64)
    lookup = np.full(1 << m, -1, dtype=np.int64)
    for i, c in enumerate(combos):
        lookup[int(sum(1 << int(j) for j in c))] = i
    return combos, lookup


def _chunking(c: int) -> tuple[int, int]:
    """Groups per 64-bit word in base ``c`` and the bits that word needs."""
    per = 1
    while c ** (per + 1) <= 2**64 - 1:
        per += 1
    return per, (c**per - 1).bit_length()


def _pack_digits(digits: np.ndarray, c: int) -> bytes:
    per, width = _chunking(c)
    full = digits.size // per
    out = b""
    if full:
        v = np.zeros(full, dtype=np.uint64)
        for j in range(per):
            v = v * np.uint64(c) + digits[: full * per].reshape(full, per)[:, j].astype(np.uint64)
        out += _pack_wide(v, width)
    tail = digits[full * per :]
    if tail.size:
        t = 0
        for d in tail.tolist():
            t = t * c + int(d)
        out += _pack_wide(np.array([t], dtype=np.uint64), (c**tail.size - 1).bit_length())
    return out


def _unpack_digits(buf: bytes, c: int, count: int) -> tuple[np.ndarray, int]:
    per, width = _chunking(c)
    full = count // per
    digits = np.zeros(count, dtype=np.int64)
    used = (full * width + 7) // 8
    if full:
        v = _unpack_wide(buf[:used], width, full)
        block = np.zeros((full, per), dtype=np.int64)
        for j in range(per - 1, -1, -1):
            block[:, j] = (v % np.uint64(c)).astype(np.int64)
            v = v // np.uint64(c)
        digits[: full * per] = block.reshape(-1)
    r = count - full * per
    if r:
        tw = (c**r - 1).bit_length()
        tlen = (tw + 7) // 8
        t = int(_unpack_wide(buf[used : used + tlen], tw, 1)[0])
        for j in range(r - 1, -1, -1):
            digits[full * per + j] = t % c
            t //= c
        used += tlen
    return digits, used


def _groups(t: torch.Tensor, m: int) -> np.ndarray:
    return nm_groups_view(t, m).numpy()


def nm_split(codes: torch.Tensor, offset: int, n: int, m: int) -> tuple[bytes, np.ndarray] | None:
    """``(u8 n | u8 m | combination indices, kept codes + offset as uint8)``, or None when
    the codes are not N:M (a group with more than ``n`` nonzeros, or a reduction dim not
    divisible by m). :func:`nm_encode` packs the kept codes after the head."""
    try:
        g = _groups(codes.to(torch.int16), m)
    except ValueError:
        return None
    nz = g != 0
    if int(nz.sum(axis=1).max(initial=0)) > n:
        return None
    # a group with fewer than n nonzeros (a kept weight that rounded to 0) keeps its
    # first zero positions too, so every group names exactly n positions
    order = np.argsort(~nz, axis=1, kind="stable")[:, :n]
    kept = np.sort(order, axis=1)
    combos, lookup = _combos(n, m)
    masks = (np.left_shift(1, kept)).sum(axis=1)
    idx = lookup[masks]
    values = np.take_along_axis(g, kept, axis=1).reshape(-1) + offset
    return _NM.pack(n, m) + _pack_digits(idx, len(combos)), values.astype(np.uint8)


def nm_encode(codes: torch.Tensor, offset: int, bits: int, n: int, m: int) -> bytes | None:
    """``u8 n | u8 m | combination indices | kept codes`` (bit-packed) or None when the
    codes are not N:M (see :func:`nm_split`)."""
    parts = nm_split(codes, offset, n, m)
    return None if parts is None else parts[0] + pack_bits(parts[1], bits)


def nm_decode(
    buf: bytes, shape: list[int], offset: int, bits: int, entropy_coded: bool = False
) -> torch.Tensor:
    """Inverse of :func:`nm_encode` (``entropy_coded``: the kept codes after the head are
    :func:`workers.codec.entropy.encode`'s instead): the signed integer codes in ``shape``."""
    n, m = _NM.unpack_from(buf)
    like = torch.empty(shape)
    numel = int(np.prod(shape))
    count = numel // m
    combos, _ = _combos(n, m)
    idx, used = _unpack_digits(buf[_NM.size :], len(combos), count)
    kept = combos[idx]
    rest = buf[_NM.size + used :]
    if entropy_coded:
        unsigned = entropy.decode(rest, count * n, bits)
    else:
        unsigned = unpack_bits(rest, bits, count * n)
    values = unsigned.astype(np.int64) - offset
    g = np.zeros((count, m), dtype=np.int64)
    np.put_along_axis(g, kept, values.reshape(count, n), axis=1)
    return from_groups(torch.from_numpy(g).to(torch.int16), like)


def information_bound(
    codes: torch.Tensor | None, weight: torch.Tensor, bits: int, kind: str = "unstructured"
) -> float:
    """Bits a tensor needs at the least. Integer ``codes``: 16 per fp16 scale, plus the
    order-0 empirical entropy of the nonzero codes (times their number) plus the
    pattern's entropy, or for an N:M layer the combination indices plus the entropy of
    the kept codes, whichever is smaller. ``codes`` None: 32 bits (``bits``) per nonzero
    float of ``weight`` plus the pattern's entropy."""
    if codes is None:
        w = weight.detach().cpu().reshape(-1)
        k = int((w != 0).sum())
        return float(bits) * k + log2_binomial(w.numel(), k)
    c = codes.detach().cpu().to(torch.int16)
    flat = c.numpy().reshape(-1)
    nonzero = flat[flat != 0]
    n, k = flat.size, nonzero.size
    scales = 16.0 * c.shape[0]
    bound = scales + entropy.entropy_bits(nonzero) + log2_binomial(n, k)
    nm = nm_of(kind)
    if nm is not None:
        parts = nm_split(c, 0, *nm)
        if parts is not None:
            keep, m = nm
            pattern = (n // m) * log2_binomial(m, keep)
            nm_bound = scales + pattern + entropy.entropy_bits(parts[1])
            bound = min(bound, nm_bound)
    return bound
