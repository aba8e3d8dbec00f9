"""Bits: integer codes packed into bytes, the symmetric int-N code range, and the N:M
group view of a weight. The bottom of every encoding the checkpoint stores."""

from __future__ import annotations

import numpy as np
import torch


def packed_len(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer codes (< 2**bits) into ``ceil(n * bits / 8)`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, but got {bits}")
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if c.size and int(c.max()) >= 1 << bits:
        raise ValueError(f"a code {int(c.max())} does not fit in {bits} bits")
    planes = (c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``n`` codes (``buf`` must hold them)."""
    if len(buf) < packed_len(n, bits):
        raise ValueError(f"{len(buf)} bytes cannot hold {n} codes of {bits} bits")
    flat = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=n * bits, bitorder="little")
    out = np.zeros(n, dtype=np.uint8)
    for j in range(bits):  # plane by plane: no n x bits temporary beyond `flat`
        out |= flat[j::bits] << np.uint8(j)
    return out


def pack_codes(codes: np.ndarray, bits: int, zero_code: int) -> bytes:
    """Bit-pack unsigned codes; when smaller, as a 1-bit mask of non-zero codes plus the
    packed non-zero codes (so sparse layers shrink). First byte says which."""
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if not 0 <= zero_code <= 255:  # no single code stands for zero: always dense
        return b"\x00" + pack_bits(c, bits)
    nonzero = c != zero_code
    dense = packed_len(c.size, bits)
    sparse = packed_len(c.size, 1) + packed_len(int(nonzero.sum()), bits)
    if sparse < dense:
        mask = np.packbits(nonzero, bitorder="little").tobytes()
        return b"\x01" + mask + pack_bits(c[nonzero], bits)
    return b"\x00" + pack_bits(c, bits)


def unpack_codes(buf: bytes, bits: int, n: int, zero_code: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    if buf[:1] == b"\x00":
        return unpack_bits(buf[1:], bits, n)
    mask_len = packed_len(n, 1)
    nz = np.unpackbits(np.frombuffer(buf[1 : 1 + mask_len], np.uint8), count=n, bitorder="little")
    nz = nz.astype(bool)
    out = np.full(n, zero_code, dtype=np.uint8)
    out[nz] = unpack_bits(buf[1 + mask_len :], bits, int(nz.sum()))
    return out


def qmax(bits: int) -> int:
    """Largest code magnitude of symmetric (restricted-range) int-N: 2^(N-1) - 1."""
    return int(2 ** (bits - 1) - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return q.float() * scale.view(shape)


def nm_groups_view(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The weight as ``[groups, m]`` runs along the reduction dimension (a view or copy)."""
    w = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    if w.shape[-1] % m != 0:
        raise ValueError(
            f"N:M sparsity with M={m} needs the reduction dimension to be a multiple of {m}, "
            f"but it is {w.shape[-1]} (weight shape {tuple(weight.shape)})"
        )
    return w.reshape(-1, m)


def from_groups(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        out, cin, kh, kw = like.shape
        return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    return groups.reshape(like.shape)
