"""The compressed checkpoint: really small bytes on disk, loaded without pickle.

Layout (little-endian)::

    b"SPARQ\\x00" | u8 version | u32 header length | zlib(JSON header) | payload

The header names the model (builtin or entrypoint + kwargs, so loading rebuilds
the module), the dataset and task (so ``sparq evaluate`` can re-measure), the
policy, and one row per tensor: ``[name, shape, encoding, bits, nbytes]``. The
payload holds the tensors back to back:

- ``raw:<dtype>``: the tensor's bytes as they are (biases, norms, float layers).
- ``q``: int-N weight, dense: fp16 per-channel scales, then codes bit-packed.
- ``qs``: int-N weight, sparse: fp16 scales, a 1-bit-per-weight nonzero mask,
  then the nonzero codes bit-packed. Chosen per layer when it is smaller.
- ``fs``: float weight, sparse: the mask then the nonzero fp32 values.
- ``qsr`` / ``fsr``: like ``qs`` / ``fs`` but the sparsity pattern is index-coded
  (Golomb-Rice gaps between the rarer of zero/nonzero positions) instead of a bitmask;
  chosen per layer when smaller (high sparsity). See :mod:`workers.codec.sparse_codec`.
- ``qnm``: int-N weight with N:M sparsity: fp16 scales, the kept positions of every
  group as one combination index (``log2 C(M, N)`` bits a group, packed), then the
  kept codes bit-packed.
- ``qe`` / ``qsre`` / ``qnme``: like ``q`` / ``qsr`` / ``qnm`` but the (nonzero, kept)
  codes entropy coded (rANS, one static model per tensor from the stored counts of the
  used codes; :mod:`workers.codec.entropy`) instead of bit-packed.
- ``qx``, ``pq``, ``mx``, ``bfp``, ``geta``: weights of the quantization methods of
  :mod:`workers.compress.quant` (per-tensor/affine int-N, iPQ with fp16 centroids, block
  formats with shared exponents, GETA), each encoded and decoded by its method
  (``workers.compress.quant.DECODERS``; bounds in ``workers.compress.quant.BOUNDS``). Activation
  quantization ranges travel in the header (``act_quant``).

Version 2 adds to the header the structured-pruning record and the example input's
shape (loading rebuilds the builtin or entrypoint model, replays the record, then
loads the tensors), and a sixth column per tensor: its information bound in bits
(value bits, for int-N codes their order-0 entropy, plus the entropy of its sparsity
pattern; see :func:`size_report`). A file keeps the bounds it was written with.

``size_bytes`` everywhere in sparq is ``len(encode(...))``: the exact file size.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from search_spaces import Policy
from service.spec import DatasetSpec, ModelSpec
from workers import entrypoints
from workers.codec import tensors
from workers.compress.batch import Inputs, describe_example, rebuild_example
from workers.errors import CheckpointError
from workers.jobs import _ckpt_safety as safety
from workers.zoo.models import BUILTINS, linear_layers

MAGIC = b"SPARQ\x00"
VERSION = 2
_READABLE = (1, 2)
_PREFIX = struct.Struct("<6sBI")


def _method_weight(model: nn.Module, key: str) -> tuple[str, int, bytes, float] | None:
    """``(encoding, bits, blob, bound)`` when the key is a weight wrapped by a
    ``workers.compress.quant`` method (each encodes itself); ``None`` for any other tensor."""
    from workers.compress.quant import WeightQuantizer
    from workers.compress.quant._common import original, parametrization

    if not key.endswith(".parametrizations.weight.original"):
        return None
    name = key.removesuffix(".parametrizations.weight.original")
    pm = parametrization(model.get_submodule(name))
    if not isinstance(pm, WeightQuantizer):
        raise CheckpointError(
            f"layer {name!r}: its weight parametrization {type(pm).__name__} is not a "
            "workers.compress.quant method, so it cannot be exported"
        )
    w = original(model.get_submodule(name))
    enc, bits, blob = pm.encode_weight(w)
    bound = pm.encode_bound(list(w.shape), enc, bits, blob)
    # down to 0.01 bit: still a lower bound, and the header does not carry 17 digits a
    # tensor (an entropy is rarely a round number)
    return enc, bits, blob, math.floor(bound * 100) / 100


def encode(
    model: nn.Module,
    *,
    model_spec: ModelSpec,
    dataset_spec: DatasetSpec | None = None,
    task: str = "classification",
    policy: Policy | None = None,
    meta: dict[str, Any] | None = None,
    pruning: list[dict[str, Any]] | None = None,
    example: Inputs | None = None,
) -> bytes:
    """Serialize a (possibly compressed) model to checkpoint bytes.

    ``pruning`` is the structured-pruning record (:func:`workers.compress.pruning.prune_channels`)
    and ``example`` an input the dependency graph is traced with when loading; both are
    needed when the model was pruned.
    """
    if pruning and example is None:
        raise CheckpointError("a pruned model needs `example` (an input) to be rebuilt")
    rows: list[list[Any]] = []
    blobs: list[bytes] = []
    tied: dict[str, str] = {}  # a tensor the model holds twice (tied weights): stored once
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in model.state_dict().items():
        stored = key.replace(".parametrizations.weight.original", ".weight")
        if ".parametrizations." not in key or key.endswith(".weight.original"):
            same = (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
            if value.numel() and same in seen:
                tied[stored] = seen[same]
                continue
            seen.setdefault(same, stored)
        weight = _method_weight(
            model, key
        )  # the methods of workers.compress.quant encode themselves
        if weight is not None:
            enc, bits, blob, bound = weight
            name = key.replace(".parametrizations.weight.original", ".weight")
            rows.append([name, list(value.shape), enc, bits, len(blob), bound])
        elif ".act_quant." in key:
            continue  # activation ranges travel in the header
        elif ".parametrizations." in key:
            continue  # the pruning mask: recoverable from the stored values
        else:
            t = value.detach().cpu().contiguous()
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in tensors.RAW_DTYPES:
                raise CheckpointError(f"tensor {key!r} has unsupported dtype {t.dtype}")
            arr = t.numpy() if dtype != "bool" else t.numpy().astype(np.uint8)
            blob = arr.tobytes()
            rows.append([key, list(t.shape), f"raw:{dtype}", 0, len(blob), 8.0 * len(blob)])
        blobs.append(blob)
    header = {
        "format": "sparq-checkpoint",
        # `pretrained` only when set: a header of a model without it does not grow
        "model": model_spec.model_dump(
            mode="json", exclude={"pretrained"} if model_spec.pretrained is None else None
        ),
        "dataset": dataset_spec.model_dump(mode="json") if dataset_spec else None,
        "task": task,
        # defaults left out: the method knobs would otherwise grow every header
        "policy": policy.compact_json() if policy else None,
        "meta": meta or {},
        "pruning": pruning or [],
        # shapes and dtypes of the input the graph is traced with: one tensor's, or a
        # mapping's (a model taking keyword inputs) under "inputs"
        "example": describe_example(example) if example is not None else None,
        "tensors": rows,
    }
    if tied:  # only when there are: other headers do not grow
        header["tied"] = tied
    from workers.compress.quant import actquant

    if act := actquant.header(model):
        header["act_quant"] = act
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return _PREFIX.pack(MAGIC, VERSION, len(packed)) + packed + b"".join(blobs)


@dataclass(frozen=True)
class Checkpoint:
    """A decoded checkpoint: the rebuilt float module plus what the header says."""

    model: nn.Module
    model_spec: ModelSpec
    dataset_spec: DatasetSpec | None
    task: str
    policy: Policy | None
    meta: dict[str, Any]
    size_bytes: int
    pruning: list[dict[str, Any]]


def read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """Parse and check the prefix and header; returns it and the payload offset.

    Nothing here is trusted: the header is inflated with a cap and checked against
    the format (:func:`workers.jobs._ckpt_safety.check_header`) and the payload size."""
    if len(data) < _PREFIX.size:
        raise CheckpointError(f"not a sparq checkpoint: {len(data)} bytes is too short")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError("not a sparq checkpoint (bad magic bytes)")
    if version not in _READABLE:
        raise CheckpointError(
            f"checkpoint version {version} is not supported (this sparq reads {_READABLE})"
        )
    start = _PREFIX.size + hlen
    if start > len(data):
        raise CheckpointError(
            f"checkpoint is {len(data)} bytes but its header says {start} for the header alone"
        )
    raw = safety.inflate_header(data[_PREFIX.size : start])
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"checkpoint header is corrupt: {type(e).__name__}") from e
    safety.check_header(header, len(data))
    expected = start + sum(row[4] for row in header["tensors"])
    if expected != len(data):
        raise CheckpointError(f"checkpoint is {len(data)} bytes but its header says {expected}")
    return header, start


def _validated(cls: Any, value: Any, what: str) -> Any:
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise CheckpointError(
            f"checkpoint {what} is invalid: {where or what}: {first.get('msg', 'invalid')}"
        ) from None


def _builtin(spec: ModelSpec, declared: int) -> nn.Module:
    """A builtin model from the header's kwargs, built on the meta device first: its
    size is checked against the declared tensors before real memory is taken."""
    fn = BUILTINS[str(spec.builtin)]
    limit = safety.MAX_FREE_ELEMENTS + 16 * declared  # pruning removes channels, not more
    try:
        with torch.device("meta"):
            meta = fn(**spec.kwargs)
        numel = sum(t.numel() for t in meta.state_dict().values())
        if numel > limit:
            raise CheckpointError(
                f"checkpoint model {spec.label!r} with kwargs {spec.kwargs!r} has {numel} "
                f"elements, far more than its {declared} stored ones; refused"
            )
        return fn(**spec.kwargs)
    except CheckpointError:
        raise
    except Exception as e:  # kwargs of the wrong type or value: the file's fault
        raise CheckpointError(
            f"checkpoint model {spec.label!r} cannot be built from kwargs {spec.kwargs!r}: "
            f"{type(e).__name__}: {e}"
        ) from None


def _model_for(
    spec: ModelSpec, model: nn.Module | None, allowed: tuple[str, ...], declared: int
) -> nn.Module:
    if model is not None:
        return model
    if spec.builtin:
        return _builtin(spec, declared)
    fn = safety.import_allowed(str(spec.entrypoint), "model.entrypoint", allowed)
    try:
        built = fn(**spec.kwargs)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint model {spec.label!r} cannot be built from kwargs {spec.kwargs!r}: "
            f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(built, nn.Module):
        raise CheckpointError(f"checkpoint model {spec.label!r} is not a torch.nn.Module")
    linear_layers(built)  # as the job built it (build_model)
    return built


# errors numpy/torch/struct raise on bytes that passed the checks but still make no
# sense (e.g. a centroid index past the centroids): the file's fault, never a crash
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, RuntimeError, struct.error)


def decode(
    data: bytes, *, model: nn.Module | None = None, allow_modules: Iterable[str] = ()
) -> Checkpoint:
    """Rebuild the module from checkpoint bytes. Never unpickles anything, never
    imports what the header names unless allowed, and raises only CheckpointError on
    a malformed file.

    ``model``: a freshly built module to load the weights into (the header's model
    is then not built; its pruning record is replayed on it). ``allow_modules``:
    module prefixes whose entrypoints the header may name (with those of
    ``$SPARQ_ENTRYPOINT_MODULES``); never the standard library or sparq's own.
    """
    header, offset = read_header(data)
    model_spec = _validated(ModelSpec, header["model"], "model")
    ds = header.get("dataset")
    dataset_spec = _validated(DatasetSpec, ds, "dataset") if ds else None
    policy_json = header.get("policy")
    policy = _validated(Policy, policy_json, "policy") if policy_json else None
    allowed = entrypoints.allowed_prefixes(allow_modules)
    # decided before anything is imported or built
    if model is None and model_spec.entrypoint:
        safety.check_entrypoint(model_spec.entrypoint, "model.entrypoint", allowed)
    if model is None and dataset_spec is not None and dataset_spec.entrypoint:
        safety.check_entrypoint(dataset_spec.entrypoint, "dataset.entrypoint", allowed)
    state: dict[str, torch.Tensor] = {}
    declared = 0
    for row in header["tensors"]:
        blob = data[offset : offset + row[4]]
        safety.check_tensor_bytes(row, blob)  # exact length before anything is allocated
        try:
            state[row[0]] = _decode(row, blob)
        except _PARSE_ERRORS as e:
            raise CheckpointError(
                f"checkpoint tensor {row[0]!r} ({row[2]}) is corrupt: {type(e).__name__}: {e}"
            ) from None
        offset += row[4]
        declared += state[row[0]].numel()
    built = _model_for(model_spec, model, allowed, declared)
    if header.get("pruning"):
        from workers.compress.pruning import replay

        ex = header["example"]
        try:
            replay(built, header["pruning"], rebuild_example(ex))
        except Exception as e:
            raise CheckpointError(
                f"cannot replay the pruning record on model {model_spec.label!r}: {e}"
            ) from e
    for alias, source in header.get("tied", {}).items():  # stored once, held twice
        state[alias] = state[source]
    try:
        built.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit model {model_spec.label!r}: {e}") from e
    if header.get("act_quant"):
        from workers.compress.quant import actquant

        try:
            actquant.restore(built, header["act_quant"])
        except (*_PARSE_ERRORS, AttributeError) as e:
            raise CheckpointError(f"checkpoint act_quant does not fit the model: {e}") from None
    built.eval()
    return Checkpoint(
        model=built,
        model_spec=model_spec,
        dataset_spec=dataset_spec,
        task=header.get("task", "classification"),
        policy=policy,
        meta=header.get("meta", {}),
        size_bytes=len(data),
        pruning=header.get("pruning", []),
    )


def size_report(data: bytes) -> dict[str, float]:
    """Bytes on disk against the information bound (value bits, for int-N codes their
    order-0 entropy, plus the entropy of each tensor's sparsity pattern; see
    :func:`workers.codec.sparse_codec.information_bound`), as stored in the file's rows.

    ``ratio`` is ``size_bytes / bound_bytes``; the header (JSON, zlib) is counted in
    the file, not in the bound.
    """
    header, start = read_header(data)
    bound_bits = sum(float(row[5]) if len(row) > 5 else 8.0 * row[4] for row in header["tensors"])
    bound = bound_bits / 8.0
    return {
        "size_bytes": len(data),
        "header_bytes": start,
        "bound_bytes": bound,
        "ratio": len(data) / bound if bound > 0 else float("inf"),
    }


def save(path: str | Path, data: bytes) -> Path:
    """Write checkpoint bytes atomically (no half-written file is ever visible)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module | None = None, allow_modules: Iterable[str] = ()
) -> Checkpoint:
    """Load a ``.sparq`` checkpoint with one call: ``load_checkpoint(p).model``.

    A header naming an entrypoint (model or dataset) loads only with ``model=`` (the
    module to load the weights into) or its module in ``allow_modules`` /
    ``$SPARQ_ENTRYPOINT_MODULES``; see :func:`decode`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}") from e
    return decode(data, model=model, allow_modules=allow_modules)


def _decode(row: list[Any], blob: bytes) -> torch.Tensor:
    """A stored tensor, by the container's encodings or a method's registered decoder."""
    from workers.compress.quant import DECODERS

    return tensors.decode_tensor(row, blob, DECODERS)
