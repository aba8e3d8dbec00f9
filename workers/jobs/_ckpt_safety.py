"""What a ``.sparq`` file must satisfy before :mod:`workers.jobs.checkpoint` uses any of it.

A checkpoint is data from someone else. Opening one never runs code it names and
never allocates more than a bounded multiple of its size:

- The zlib header is inflated with a cap (:data:`MAX_HEADER_BYTES`) and must end
  exactly where the prefix says; its JSON is checked key by key (types, required
  keys, shapes as lists of non-negative ints, known encodings, bit widths).
- The tensors' declared bytes must add up to the payload, and each tensor's bytes
  must be exactly what its shape, encoding and bits need (:func:`expected_nbytes`
  reads only the few head bytes and mask popcounts it needs for that; nothing the
  size of the tensor is allocated before the check passes).
- The total declared element count is bounded by the file size:
  ``MAX_FREE_ELEMENTS + ELEMENTS_PER_BYTE * len(file)``. Dense encodings need at
  least ``bits / 8`` bytes a weight anyway (a 1-bit mask: 8 weights a byte); the
  index-coded patterns (``qsr``/``fsr``), N:M codes of very sparse layers and
  entropy-coded codes (``qe``/``qsre``/``qnme``, whose heads are parsed and checked by
  :func:`workers.codec.entropy.read_header`) legitimately go below that, and the bound
  leaves them 32 weights a byte (0.25 bits a weight, over the whole file).
- Entrypoints named by the header (model or dataset) are imported only when the
  caller allows their module (:func:`check_entrypoint`, the rule of
  :mod:`workers.entrypoints`), decided before importing.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np

from search_spaces._policy import NM_KINDS
from workers import entrypoints
from workers.codec import entropy
from workers.errors import CheckpointError

MAX_HEADER_BYTES = 4 << 20  # inflated JSON header
MAX_TENSORS = 100_000
MAX_DIMS = 8
MAX_FREE_ELEMENTS = 1 << 20  # any file may declare this many elements...
ELEMENTS_PER_BYTE = 32  # ...plus this many per byte of the file
MAX_PRUNING_STEPS = 10_000
MAX_EXAMPLE_ELEMENTS = 1 << 20
MAX_EXAMPLE_INPUTS = 16  # keyword inputs of a model's example
MAX_TIED = 4096  # tensors stored once and held by more than one name
EXAMPLE_DTYPES = ("float32", "float16", "float64", "int64", "int32", "uint8", "bool")

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
_RAW_ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1}
QUANT_ENCODINGS = ("q", "qs", "qsr", "qnm", "qe", "qsre", "qnme")  # tensors.INT_CHANNEL_ENCODINGS
METHOD_ENCODINGS = ("qx", "pq", "mx", "bfp", "geta")
ENCODINGS = (
    *(f"raw:{d}" for d in _RAW_ITEMSIZE),
    "fs",
    "fsr",
    *QUANT_ENCODINGS,
    *METHOD_ENCODINGS,
)
_BLOCK = {"mx": 32, "bfp": 64}  # workers.compress.quant.blockfmt.BLOCK
_FP_BITS = (4, 6, 8)  # workers.compress.quant.blockfmt.FP_ELEMENTS


# ---------------------------------------------------------------- the header


def inflate_header(compressed: bytes) -> bytes:
    """zlib-inflate at most :data:`MAX_HEADER_BYTES`; refuse more, refuse trailing junk."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(compressed, MAX_HEADER_BYTES + 1)
    except zlib.error as e:
        raise CheckpointError(f"checkpoint header is corrupt: {e}") from e
    if len(out) > MAX_HEADER_BYTES or d.unconsumed_tail:
        raise CheckpointError(
            f"checkpoint header inflates to more than {MAX_HEADER_BYTES} bytes; refused"
        )
    if not d.eof:
        raise CheckpointError("checkpoint header is truncated (zlib stream does not end)")
    if d.unused_data:
        raise CheckpointError("checkpoint header length is wrong (bytes after the zlib stream)")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise CheckpointError(f"checkpoint header is invalid: {what}")


def _shape(v: Any, what: str, max_elements: int) -> int:
    _need(isinstance(v, list) and len(v) <= MAX_DIMS, f"{what} must be a list of <= {MAX_DIMS}")
    _need(all(_is_int(d) and d >= 0 for d in v), f"{what} must hold non-negative ints, got {v!r}")
    n = 1
    for d in v:
        n *= d
        _need(n <= max_elements, f"{what} {v!r} has more than {max_elements} elements")
    return n


def check_header(header: Any, file_size: int) -> int:
    """Check the header's structure; returns the total declared element count."""
    _need(isinstance(header, dict), "not a JSON object")
    fmt = header.get("format", "sparq-checkpoint")
    _need(fmt == "sparq-checkpoint", f"format {fmt!r}")
    for key in ("model", "tensors"):
        _need(key in header, f"missing {key!r}")
    _need(isinstance(header["model"], dict), "`model` must be an object")
    for key in ("dataset", "policy", "example"):
        v = header.get(key)
        _need(v is None or isinstance(v, dict), f"`{key}` must be an object or null")
    _need(isinstance(header.get("task", "classification"), str), "`task` must be a string")
    _need(isinstance(header.get("meta", {}), dict), "`meta` must be an object")
    budget = MAX_FREE_ELEMENTS + ELEMENTS_PER_BYTE * file_size
    rows = header["tensors"]
    _need(isinstance(rows, list) and len(rows) <= MAX_TENSORS, "`tensors` must be a list")
    names: set[str] = set()
    total = 0
    for i, row in enumerate(rows):
        _need(isinstance(row, list) and len(row) in (5, 6), f"tensors[{i}] must be a 5/6-list")
        name, shape, enc, bits, nbytes = row[:5]
        _need(isinstance(name, str) and 0 < len(name) <= 1000, f"tensors[{i}] name")
        _need(name not in names, f"tensor {name!r} appears twice")
        names.add(name)
        n = _shape(shape, f"tensor {name!r} shape", budget)
        _need(isinstance(enc, str) and enc in ENCODINGS, f"tensor {name!r} encoding {enc!r}")
        float_enc = enc.startswith("raw:") or enc in ("fs", "fsr")  # bits: the layer's (32)
        lo, hi = (0, 32) if float_enc else (1, 8)
        _need(_is_int(bits) and lo <= bits <= hi, f"tensor {name!r} bits {bits!r}")
        _need(_is_int(nbytes) and 0 <= nbytes <= file_size, f"tensor {name!r} nbytes {nbytes!r}")
        if len(row) == 6:
            _need(_is_num(row[5]) and row[5] >= 0, f"tensor {name!r} bound {row[5]!r}")
        if not float_enc:
            _need(len(shape) >= 1 and shape[0] > 0, f"tensor {name!r} needs an output dim")
        total += n
        _need(
            total <= budget,
            f"tensors declare more than {budget} elements for a {file_size}-byte file "
            f"(at most {MAX_FREE_ELEMENTS} + {ELEMENTS_PER_BYTE} per byte)",
        )
    pruning = header.get("pruning", [])
    _need(isinstance(pruning, list) and len(pruning) <= MAX_PRUNING_STEPS, "`pruning` list")
    for step in pruning:
        _need(isinstance(step, dict), "a pruning step must be an object")
        _need(isinstance(step.get("group"), str), "a pruning step needs a `group` string")
        idxs = step.get("idxs")
        _need(isinstance(idxs, list) and all(_is_int(j) and j >= 0 for j in idxs), "pruning idxs")
    ex = header.get("example")
    if pruning:
        _need(isinstance(ex, dict), "a pruned checkpoint needs `example`")
    if ex is not None:
        _need(isinstance(ex, dict), "`example` must be an object")
        inputs = ex.get("inputs")
        if inputs is not None:  # a model taking keyword inputs: one entry per keyword
            _need(
                isinstance(inputs, dict) and 0 < len(inputs) <= MAX_EXAMPLE_INPUTS,
                f"`example.inputs` must be an object of 1 to {MAX_EXAMPLE_INPUTS} inputs",
            )
            _need(set(ex) == {"inputs"}, "`example` holds `inputs` or a shape, not both")
            for key, one in inputs.items():
                _need(
                    isinstance(key, str) and key.isidentifier() and isinstance(one, dict),
                    f"example input {key!r}",
                )
                _shape(one.get("shape"), f"example {key} shape", MAX_EXAMPLE_ELEMENTS)
                _need(one.get("dtype") in EXAMPLE_DTYPES, f"example {key} dtype")
        else:
            _shape(ex.get("shape"), "example shape", MAX_EXAMPLE_ELEMENTS)
            _need(ex.get("dtype") in EXAMPLE_DTYPES, f"example dtype {ex.get('dtype')!r}")
    tied = header.get("tied", {})
    _need(isinstance(tied, dict) and len(tied) <= MAX_TIED, f"`tied`: at most {MAX_TIED}")
    names = {row[0] for row in header["tensors"] if isinstance(row, list) and row}
    for alias, source in tied.items():
        _need(
            isinstance(alias, str) and isinstance(source, str) and source in names,
            f"tied tensor {alias!r} must name a stored tensor, not {source!r}",
        )
        _need(alias not in names, f"tied tensor {alias!r} is also stored")
    act = header.get("act_quant", {})
    _need(isinstance(act, dict), "`act_quant` must be an object")
    for name, v in act.items():
        _need(
            isinstance(v, list)
            and len(v) == 3
            and _is_int(v[0])
            and 2 <= v[0] <= 8
            and _is_num(v[1])
            and _is_num(v[2]),
            f"act_quant[{name!r}] must be [bits 2..8, lo, hi]",
        )
    return total


# ---------------------------------------------------------------- tensor bytes


def _packed(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def mask_popcount(mask: bytes, n: int) -> int:
    """Ones among the first ``n`` bits (LSB first) of a packed mask of ``ceil(n/8)`` bytes."""
    if n == 0:
        return 0
    arr = np.frombuffer(mask, dtype=np.uint8)
    ones = int(_POPCOUNT[arr[:-1]].sum())
    tail = n - 8 * (arr.size - 1)
    return ones + int(_POPCOUNT[int(arr[-1]) & ((1 << tail) - 1)])


class _Reader:
    """Bounds-checked cursor over one tensor's blob."""

    def __init__(self, blob: bytes, name: str) -> None:
        self.blob, self.off, self.name = blob, 0, name

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.off + n > len(self.blob):
            raise CheckpointError(
                f"tensor {self.name!r}: {what} needs {n} bytes at offset {self.off}, "
                f"but its data has {len(self.blob)}"
            )
        out = self.blob[self.off : self.off + n]
        self.off += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def mask(self, n: int, what: str = "the sparsity mask") -> int:
        return mask_popcount(self.take(_packed(n, 1), what), n)

    def rice(self, n: int) -> int:
        """Skip an index-coded pattern of ``n`` positions; returns the nonzero count."""
        symbol, k, m = self.unpack("<BBI", "the index-coded pattern head")
        if symbol not in (0, 1) or k > 32 or m > n:
            raise CheckpointError(
                f"tensor {self.name!r}: index-coded pattern head (symbol={symbol}, k={k}, "
                f"count={m}) is invalid for {n} values"
            )
        if m:
            rest = np.frombuffer(self.blob, dtype=np.uint8, offset=self.off)
            zeros = np.cumsum(8 - _POPCOUNT[rest])  # zero bits (terminators) up to each byte
            end = int(np.searchsorted(zeros, m))  # byte holding the m-th terminator
            if end >= rest.size:
                raise CheckpointError(f"tensor {self.name!r}: index-coded pattern is truncated")
            self.take(end + 1, "the unary stream")
            self.take(_packed(m, k), "the remainders")
        return m if symbol == 1 else n - m

    def entropy(self, n: int, bits: int) -> None:
        """Skip an entropy-coded blob of ``n`` codes (its head checked, not its stream)."""
        head = entropy.read_header(memoryview(self.blob), n, bits, self.off)
        self.take(head.end - self.off, "the entropy-coded codes")

    def codes(self, n: int, bits: int) -> None:
        """A ``workers.compress.quant`` code blob: flag byte, then dense or mask + nonzero codes."""
        (flag,) = self.unpack("<B", "the code-blob flag")
        if flag == 0:
            self.take(_packed(n, bits), "the codes")
        elif flag == 1:
            self.take(_packed(self.mask(n), bits), "the nonzero codes")
        else:
            raise CheckpointError(f"tensor {self.name!r}: unknown code-blob flag {flag}")


def _nm_digit_bytes(count: int, combos: int) -> int:
    """Bytes of ``count`` base-``combos`` digits packed as ``sparse_codec._pack_digits``."""
    per = 1
    while combos ** (per + 1) <= 2**64 - 1:
        per += 1
    width = (combos**per - 1).bit_length()
    full, r = divmod(count, per)
    used = (full * width + 7) // 8
    if r:
        used += ((combos**r - 1).bit_length() + 7) // 8
    return used


def check_tensor_bytes(row: list[Any], blob: bytes) -> None:
    """Raise unless ``blob`` is exactly as long as the row's shape/encoding/bits need."""
    name, shape, enc, bits = row[:4]
    n = math.prod(shape)
    r = _Reader(blob, name)
    if enc.startswith("raw:"):
        r.take(n * _RAW_ITEMSIZE[enc[4:]], "the raw values")
    elif enc in ("fs", "fsr"):
        k = r.mask(n) if enc == "fs" else r.rice(n)
        r.take(4 * k, "the nonzero fp32 values")
    elif enc in QUANT_ENCODINGS:
        r.take(2 * shape[0], "the fp16 scales")
        if enc == "q":
            r.take(_packed(n, bits), "the codes")
        elif enc == "qe":
            r.entropy(n, bits)
        elif enc in ("qs", "qsr"):
            k = r.mask(n) if enc == "qs" else r.rice(n)
            r.take(_packed(k, bits), "the nonzero codes")
        elif enc == "qsre":
            r.entropy(r.rice(n), bits)
        else:  # qnm, qnme
            keep, m = r.unpack("<BB", "the N:M head")
            if (keep, m) not in NM_KINDS.values():
                raise CheckpointError(f"tensor {name!r}: N:M {keep}:{m} is not supported")
            red = shape[1] if len(shape) == 4 else shape[-1]  # sparsity.nm_groups_view
            if len(shape) < 2 or red % m:
                raise CheckpointError(f"tensor {name!r}: shape {shape} cannot be {keep}:{m}")
            count = n // m
            r.take(_nm_digit_bytes(count, math.comb(m, keep)), "the N:M combination indices")
            if enc == "qnme":
                r.entropy(count * keep, bits)
            else:
                r.take(_packed(count * keep, bits), "the kept codes")
    elif enc == "qx":
        per_tensor, symmetric, nscale = r.unpack("<BBH", "the qx head")
        want = 1 if per_tensor else shape[0]
        if per_tensor not in (0, 1) or symmetric not in (0, 1) or nscale != want:
            raise CheckpointError(f"tensor {name!r}: qx head names {nscale} scales, not {want}")
        r.take(2 * nscale * (1 if symmetric else 2), "the scales")
        r.codes(n, bits)
    elif enc == "pq":
        k, bs = r.unpack("<HH", "the pq head")
        if not (1 <= k <= 1 << bits) or bs < 1 or n % bs:
            raise CheckpointError(f"tensor {name!r}: pq head k={k}, block={bs} does not fit")
        r.take(2 * k * bs, "the fp16 centroids")
        r.take(_packed(n // bs, bits), "the assignments")
    elif enc in _BLOCK:
        is_fp, nblocks = r.unpack("<BI", f"the {enc} head")
        fan = n // shape[0]
        want = shape[0] * -(-fan // _BLOCK[enc])
        if is_fp not in (0, 1) or nblocks != want or (is_fp and bits not in _FP_BITS):
            raise CheckpointError(f"tensor {name!r}: {enc} head names {nblocks} blocks, not {want}")
        r.take(nblocks, "the shared exponents")
        r.codes(n, bits)
    elif enc == "geta":
        r.take(4, "the geta step")
        r.codes(n, bits)
    else:  # check_header let through an encoding this function does not know: a bug
        raise AssertionError(f"no byte check for encoding {enc!r}")
    if r.off != len(blob):
        raise CheckpointError(
            f"tensor {name!r} ({enc}, shape {shape}) has {len(blob)} bytes, but needs {r.off}"
        )


# ---------------------------------------------------------------- entrypoints
# The rule is workers/entrypoints.py's; a checkpoint says how its caller allows more.


def _how(entrypoint: str) -> str:
    module = entrypoint.partition(":")[0]
    return (
        f"pass model=... (the module to load into) or --allow-module {module} "
        f"(allow_modules=[{module!r}], or {entrypoints.ENV}) if you trust it"
    )


def check_entrypoint(entrypoint: str, field: str, allowed: tuple[str, ...]) -> str:
    """The allowed prefix the entrypoint's module lies under; raises (before any import)
    when there is none."""
    try:
        return entrypoints.check(entrypoint, f"checkpoint {field}", allowed, _how(entrypoint))
    except entrypoints.NotAllowed as e:
        raise CheckpointError(str(e)) from None


def import_allowed(entrypoint: str, field: str, allowed: tuple[str, ...]) -> Any:
    """Import an allowed entrypoint (as a spec's is imported); the function itself must
    come from the allowed module too (no ``os.system`` re-exported through it)."""
    try:
        return entrypoints.load(entrypoint, f"checkpoint {field}", allowed, _how(entrypoint))
    except (entrypoints.NotAllowed, ImportError, AttributeError) as e:
        raise CheckpointError(str(e)) from None
