"""Entropy coding of integer weight codes: the Huffman stage of Deep Compression (Han
et al., 2016), done with rANS (Duda, 2013; the ``constriction`` library's ``AnsCoder``).

One static order-0 model per tensor, built from the exact counts of the codes that
occur; the counts are stored, so the decoder rebuilds the same model bit for bit
(``Categorical(counts as float64, perfect=False)`` on both sides: the library's
fixed-point quantization of those floats is deterministic; its version is pinned
because another version could quantize them otherwise). The stream then costs the
codes' order-0 empirical entropy plus at most a few bytes.

Layout (little-endian)::

    used-symbol bitmap (2**bits bits, LSB first) | counts of the used symbols but
    the last (LEB128 varints; the last is n minus their sum) | LEB128 stream bytes |
    the rANS stream (uint32 words, little-endian, the last word's zero high bytes cut)

A tensor whose codes are all one symbol stores no stream (0 bytes). The decoder checks
what it can without a checksum: the header's counts add up to ``n``, the stream ends
with the coder back in its initial state, and the decoded codes have exactly the stored
counts; anything else raises :class:`~workers.errors.CheckpointError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

from workers.errors import CheckpointError

_MAX_VARINT_BYTES = 10  # a uint64 in LEB128


@dataclass(frozen=True)
class Header:
    """The parsed head of an entropy-coded blob: which symbols occur, how often, and
    where the rANS stream lies in the blob (``start`` to ``end``)."""

    symbols: np.ndarray  # uint8, ascending
    counts: np.ndarray  # int64, > 0, summing to n
    start: int
    end: int


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes | memoryview, off: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if off + i >= len(buf):
            raise CheckpointError(f"entropy-coded codes: {what} is truncated at byte {off + i}")
        byte = buf[off + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, off + i + 1
    raise CheckpointError(f"entropy-coded codes: {what} is longer than {_MAX_VARINT_BYTES} bytes")


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    """The coding model of both directions, from the exact integer counts only."""
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 for entropy-coded codes, but got {bits}")


def encode(codes: np.ndarray, bits: int) -> bytes:
    """Entropy-code unsigned codes (each < ``2**bits``); :func:`decode` inverts it."""
    _check_bits(bits)
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if c.size and int(c.max()) >= 1 << bits:
        raise ValueError(f"a code {int(c.max())} does not fit in {bits} bits")
    hist = np.bincount(c, minlength=1 << bits)
    present = hist > 0
    bitmap = np.packbits(present, bitorder="little").tobytes()
    counts = hist[present]
    head = bitmap + b"".join(_varint(int(v)) for v in counts[:-1])
    if counts.size <= 1:  # zero or one symbol: nothing to code
        return head + _varint(0)
    index = (np.cumsum(present) - 1).astype(np.int32)  # code -> index among the used
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(index[c], _model(counts))
    words = coder.get_compressed()  # never ends in a 0 word
    top = (int(words[-1]).bit_length() + 7) // 8  # the last word's bytes up to its top 1
    stream = words.astype("<u4").tobytes()[: 4 * (words.size - 1) + top]
    return head + _varint(len(stream)) + stream


def read_header(buf: bytes | memoryview, n: int, bits: int, offset: int = 0) -> Header:
    """Parse and check the head of an entropy-coded blob of ``n`` codes starting at
    ``offset`` of ``buf``; reads only the head (never the stream)."""
    _check_bits(bits)
    nmap = ((1 << bits) + 7) // 8
    if offset + nmap > len(buf):
        raise CheckpointError(
            f"entropy-coded codes: the {nmap}-byte symbol bitmap is truncated "
            f"({len(buf) - offset} bytes left)"
        )
    bitmap = np.frombuffer(bytes(buf[offset : offset + nmap]), dtype=np.uint8)
    present = np.unpackbits(bitmap, bitorder="little")
    if present[1 << bits :].any():
        raise CheckpointError(f"entropy-coded codes: the bitmap names a symbol >= 2**{bits}")
    symbols = np.flatnonzero(present[: 1 << bits]).astype(np.uint8)
    if (symbols.size == 0) != (n == 0):
        raise CheckpointError(
            f"entropy-coded codes: {symbols.size} used symbols for {n} codes "
            "(none exactly when there are no codes)"
        )
    off = offset + nmap
    counts = np.zeros(symbols.size, dtype=np.int64)
    for i in range(symbols.size - 1):
        counts[i], off = _read_varint(buf, off, f"the count of symbol {int(symbols[i])}")
        if counts[i] == 0 or int(counts[: i + 1].sum()) >= n:
            raise CheckpointError(
                f"entropy-coded codes: count {int(counts[i])} of symbol {int(symbols[i])} "
                f"must be > 0 and leave the last symbol some of the {n} codes"
            )
    if symbols.size:
        counts[-1] = n - int(counts[:-1].sum())
    length, off = _read_varint(buf, off, "the stream length")
    if symbols.size <= 1 and length:
        raise CheckpointError(
            f"entropy-coded codes: stream length {length} for a single symbol (must be 0)"
        )
    if symbols.size > 1 and length == 0:
        raise CheckpointError("entropy-coded codes: stream length 0 for two or more symbols")
    if off + length > len(buf):
        raise CheckpointError(
            f"entropy-coded codes: the stream needs {length} bytes at offset {off}, "
            f"but only {len(buf) - off} are left"
        )
    return Header(symbols, counts, off, off + length)


def decode(buf: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`encode`: ``n`` unsigned codes (uint8). ``buf`` holds exactly
    the blob (bytes after it are an error)."""
    h = read_header(buf, n, bits)
    if h.end != len(buf):
        raise CheckpointError(
            f"entropy-coded codes: {len(buf) - h.end} bytes after the stream's end"
        )
    if h.symbols.size <= 1:
        return np.full(n, h.symbols[0] if n else 0, dtype=np.uint8)
    stream = bytes(buf[h.start : h.end])
    stream += b"\x00" * (-len(stream) % 4)
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, dtype="<u4"))
        index = coder.decode(_model(h.counts), n)
    except ValueError as e:  # the library refuses a stream (e.g. one ending in a 0 word)
        raise CheckpointError(f"entropy-coded codes: the stream is invalid: {e}") from None
    if not coder.is_empty():
        raise CheckpointError(
            f"entropy-coded codes: the stream does not end after {n} codes (corrupt or truncated)"
        )
    got = np.bincount(index, minlength=h.symbols.size)
    if got.size != h.symbols.size or not np.array_equal(got, h.counts):
        raise CheckpointError(
            "entropy-coded codes: the decoded codes do not have the stored counts (corrupt)"
        )
    return h.symbols[index]


def entropy_bits(codes: np.ndarray) -> float:
    """Order-0 empirical entropy of the codes times their number, in bits: the least a
    static per-tensor code (this module's) can spend on them."""
    c = np.asarray(codes, dtype=np.int64).reshape(-1)
    if c.size == 0:
        return 0.0
    counts = np.bincount(c - c.min())
    counts = counts[counts > 0]
    p = counts / c.size
    return float(-(counts * np.log2(p)).sum()) + 0.0  # + 0.0: never -0.0
