"""Opening a checkpoint someone else made: every malformed file (truncated, bit-flipped,
lying header, zlib bomb, entrypoints naming the standard library) either loads or
raises CheckpointError, quickly, within a bounded multiple of its size, and never runs
what it names."""

from __future__ import annotations

import json
import random
import struct
import sys
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from typer.testing import CliRunner

from search_spaces import LayerPolicy, Policy
from service.spec import DatasetSpec, ModelSpec
from workers import entrypoints
from workers.codec import tensors
from workers.compress import quant
from workers.compress.engine import compressible_layers
from workers.compress.quant import apply as apply_policy
from workers.compress.quant import ipq
from workers.errors import CheckpointError
from workers.jobs import _ckpt_safety as safety
from workers.jobs import checkpoint as ckpt
from workers.zoo.models import digits_mlp

MLP = {"hidden": 32}
SPEC = ModelSpec(builtin="digits-mlp", kwargs=MLP)
DATA = DatasetSpec(builtin="digits")
# what a load may take (numpy allocations, traced): the element budget of the format
# lets a B-byte file decode to at most MAX_FREE_ELEMENTS + 32 B float32 values (plus a
# bool pattern each); see workers/jobs/_ckpt_safety.py
FIXED = 16 << 20


def _mem_limit(size: int) -> int:
    return 200 * size + FIXED


def _engine(layer: Callable[[int, str], LayerPolicy]) -> bytes:
    torch.manual_seed(0)
    model = digits_mlp(**MLP)
    infos = compressible_layers(model)
    policy = Policy(
        layers={info.name: layer(i, info.name) for i, info in enumerate(infos)},
        noise_rate=0.5,
        noise_block=1,
    )
    apply_policy(model, policy).eval()
    return ckpt.encode(model, model_spec=SPEC, dataset_spec=DATA, policy=policy)


def _method(method: str, **kw: Any) -> bytes:
    torch.manual_seed(0)
    model = digits_mlp(**MLP)
    layers = {i.name: LayerPolicy(bits=4, sparsity=0.5) for i in compressible_layers(model)}
    policy = Policy(layers=layers, method=method, noise_rate=0.5, **kw)
    if method == "ipq":
        ipq.quantize_layers(model, list(layers), k=8, block=4)
    else:
        quant.apply(model, policy)
    model.eval()
    return ckpt.encode(model, model_spec=SPEC, dataset_spec=DATA, policy=policy)


def _packed_only(build: Callable[[], bytes]) -> bytes:
    """A file as sparq wrote it before entropy coding: the int-N codes bit-packed
    (``q``/``qs``/``qsr``/``qnm``), the entropy-coded options made too large to win."""
    with mock.patch.object(tensors.entropy, "encode", lambda c, _: b"\xff" * (len(c) + 64)):
        return build()


def _forced(enc: str, build: Callable[[], bytes]) -> bytes:
    """A file whose int-N layers use ``enc`` where it applies (``qsre`` is rarely the
    smallest: entropy coding the dense codes costs about as little)."""

    def encode(codes: torch.Tensor, scale: torch.Tensor, bits: int, kind: str) -> Any:
        options = tensors.int_channel_options(codes, bits, kind)
        use = enc if enc in options else "q"
        return use, scale.numpy().astype("<f2").tobytes() + options[use]

    with mock.patch.object(tensors, "encode_int_channel", encode):
        return build()


def _bases() -> dict[str, bytes]:
    nm = partial(
        _engine,
        lambda i, _: (
            LayerPolicy(bits=4, sparsity=0.5, kind="2:4")
            if i < 2
            else LayerPolicy(bits=32, sparsity=0.5)
        ),
    )
    return {
        "q-qs": _packed_only(
            partial(_engine, lambda i, _: LayerPolicy(bits=4, sparsity=0.5 if i else 0.0))
        ),
        "qsr-fsr": _packed_only(
            partial(_engine, lambda i, _: LayerPolicy(bits=2 if i else 32, sparsity=0.95))
        ),
        "qnm-fs": _packed_only(nm),
        "qe": _engine(lambda i, _: LayerPolicy(bits=[2, 3, 4][i], sparsity=[0.5, 0.9, 0.0][i])),
        "qsre": _forced(
            "qsre", partial(_engine, lambda i, _: LayerPolicy(bits=3, sparsity=[0.5, 0.9, 0][i]))
        ),
        "qnme": nm(),
        "qx": _method("quant_noise", granularity="tensor", symmetric=False),
        "mx": _method("mx", mx_element="fp"),
        "pq": _method("ipq", ipq_centroids=8),
    }


BASES = _bases()


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    header, start = ckpt.read_header(data)
    return header, data[start:]


def _join(header: Any, payload: bytes, *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    packed = zlib.compress(body, 6)
    return ckpt._PREFIX.pack(ckpt.MAGIC, ckpt.VERSION, len(packed)) + packed + payload


def _load(data: bytes, **kw: Any) -> str:
    """Load under tracemalloc: 'ok' or the CheckpointError; anything else fails."""
    tracemalloc.start()
    try:
        ckpt.decode(data, **kw)
        outcome = "ok"
    except CheckpointError as e:
        outcome = str(e)
        assert "\n" not in outcome.strip() or "does not fit" in outcome, outcome
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < _mem_limit(len(data)), f"{peak} bytes traced for a {len(data)}-byte file"
    return outcome


def test_the_bases_load() -> None:
    encodings = set()
    for name, data in BASES.items():
        assert _load(data) == "ok", name
        encodings |= {row[2] for row in _split(data)[0]["tensors"]}
    want = {"q", "qsr", "fsr", "qnm", "qe", "qsre", "qnme", "qx", "mx", "pq", "raw:float32"}
    assert want <= encodings, encodings


def _truncations(data: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    cuts = {0, 1, 5, 6, 7, 10, 11, len(data) - 1}
    cuts |= {rng.randrange(len(data)) for _ in range(count)}
    for c in sorted(cuts):
        yield data[:c]


def _bitflips(data: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    header_end = ckpt._PREFIX.size + ckpt._PREFIX.unpack_from(data)[2]
    for i in range(count):
        b = bytearray(data)
        # half in the prefix + header (mostly caught by zlib), half in the payload
        lo, hi = (0, header_end) if i % 2 else (header_end, len(data))
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(lo, hi)
            b[pos] ^= 1 << rng.randrange(8)
        yield bytes(b)


def _payload_heads(data: bytes) -> Iterator[bytes]:
    """Each tensor's first bytes overwritten: lying in-blob heads (counts, n:m, k)."""
    header, payload = _split(data)
    off = 0
    for row in header["tensors"]:
        for junk in (b"\xff" * 8, b"\x00" * 8, b"\x01\xff\xff\xff\x7f\x00\x00\x00"):
            n = min(len(junk), row[4])
            p = bytearray(payload)
            p[off : off + n] = junk[:n]
            yield _join(header, bytes(p))
        off += row[4]


BAD_VALUES: list[Any] = [
    None,
    -1,
    2**26,
    2**63,
    1.5,
    "4",
    True,
    [],
    {},
    [2**40, 2**40],
    [-3, 4],
    [1] * 64,
    "raw:object",
]


def _lying_headers(data: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    header, payload = _split(data)
    rows = header["tensors"]
    for _ in range(count):
        h = json.loads(json.dumps(header))
        i = rng.randrange(len(rows))
        col = rng.randrange(6)
        h["tensors"][i][col] = rng.choice(BAD_VALUES)
        yield _join(h, payload)
    # consistent lies: a huge shape whose nbytes is "right" for its claimed encoding
    for enc, bits in [("q", 1), ("fsr", 32), ("qsr", 1), ("raw:bool", 0), ("qnm", 1)]:
        h = json.loads(json.dumps(header))
        h["tensors"] = [["w", [1 << 13, 1 << 13], enc, bits, len(payload)]]
        yield _join(h, payload)
    for key, value in [
        ("tensors", {}),
        ("tensors", [[]]),
        ("model", "digits-mlp"),
        ("model", {"builtin": "digits-mlp", "kwargs": {"hidden": 10**7}}),
        ("model", {"builtin": "digits-mlp", "kwargs": {"hidden": -5}}),
        ("model", {"builtin": "digits-mlp", "kwargs": {"nope": 1}}),
        ("model", {"builtin": "resnet1000"}),
        ("dataset", {"builtin": "imagenet"}),
        ("policy", {"layers": 5}),
        ("meta", []),
        ("task", 3),
        ("pruning", [{"group": "0", "idxs": [0]}]),
        ("pruning", [{"group": 5}]),
        ("example", {"shape": [1 << 20, 1 << 20], "dtype": "float32"}),
        ("example", {"shape": [1, 64], "dtype": "load"}),
        ("act_quant", {"1": [4, 0.0]}),
        ("act_quant", {"nope": [4, 0.0, 1.0]}),
        ("format", "zip"),
    ]:
        h = json.loads(json.dumps(header))
        h[key] = value
        yield _join(h, payload)
    for key in ("model", "tensors"):
        h = json.loads(json.dumps(header))
        del h[key]
        yield _join(h, payload)
    yield _join(None, payload, raw=b"[" * 200_000)  # nesting bomb
    yield _join(None, payload, raw=b"\xff\xfe not json")
    yield _join(None, payload, raw=b"[1, 2]")
    lied = bytearray(data)  # header length in the prefix too long, too short
    struct.pack_into("<I", lied, 7, 10**9)
    yield bytes(lied)
    struct.pack_into("<I", lied, 7, 3)
    yield bytes(lied)


def _fuzz(count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seen = {"ok": 0, "refused": 0}
    for data in BASES.values():
        cases = [
            *_truncations(data, rng, count),
            *_bitflips(data, rng, count),
            *_payload_heads(data),
            *_lying_headers(data, rng, count),
        ]
        for case in cases:
            seen["ok" if _load(case) == "ok" else "refused"] += 1
    return seen


@pytest.mark.timeout(60)
def test_fuzzed_checkpoints_load_or_raise_checkpoint_error() -> None:
    seen = _fuzz(count=12, seed=0)
    assert seen["refused"] > 300, seen


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", range(5))
def test_fuzzed_checkpoints_many(seed: int) -> None:
    _fuzz(count=300, seed=seed)


@pytest.mark.timeout(60)
def test_zlib_bombs_are_refused_without_inflating() -> None:
    payload = _split(BASES["q-qs"])[1]
    for body in (b" " * (256 << 20), b'{"tensors": [' + b"0," * (8 << 20) + b"0]}"):
        data = _join(None, payload, raw=body)
        assert len(data) < len(body) / 100
        msg = _load(data)
        assert "inflates to more than" in msg, msg


def test_huge_claims_are_refused_before_allocation() -> None:
    # the reproduction: 186 bytes claiming one tensor of 2**26 codes
    header = {"model": SPEC.model_dump(mode="json"), "tensors": [["w", [1 << 26], "q", 8, 150]]}
    data = _join(header, b"\x00" * 150)
    assert "elements" in _load(data)
    header["tensors"] = [["0.weight", [1 << 26], "qsr", 1, 16]]
    assert "elements" in _load(_join(header, b"\x00" * 16))


def _with_model(data: bytes, model: dict[str, Any], dataset: Any = "keep") -> bytes:
    header, payload = _split(data)
    header["model"] = model
    if dataset != "keep":
        header["dataset"] = dataset
    return _join(header, payload)


def test_os_system_entrypoint_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    cmd = {"command": f"touch {marker}"}
    cases = [
        ({"entrypoint": "os:system", "kwargs": cmd}, "keep", ("os",)),
        ({"entrypoint": "os:system", "kwargs": cmd}, "keep", ()),
        ({"entrypoint": "builtins:exec", "kwargs": {"source": "1"}}, "keep", ("builtins",)),
        ({"entrypoint": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}}, "keep", ()),
        ({"entrypoint": "workers.zoo.models:build_model"}, "keep", ("workers",)),
        (SPEC.model_dump(), {"entrypoint": "os:system", "kwargs": cmd}, ()),
        (SPEC.model_dump(), {"entrypoint": "subprocess:run", "kwargs": {}}, ("subprocess",)),
    ]
    for model, dataset, allow in cases:
        data = _with_model(BASES["q-qs"], model, dataset)
        with pytest.raises(CheckpointError, match=r"is (never|not) allowed") as e:
            ckpt.decode(data, allow_modules=allow)
        assert "--allow-module" in str(e.value) or "never allowed" in str(e.value)
    assert not marker.exists()


def test_allowed_module_loads_and_reexports_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "fuzzpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from os import system\n"
        "from workers.zoo.models import digits_mlp as reexported\n"
        "def mlp(**kw):\n"
        "    from workers.zoo.models import digits_mlp\n"
        "    return digits_mlp(**kw)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "pwned"
    data = _with_model(BASES["q-qs"], {"entrypoint": "fuzzpkg:mlp", "kwargs": MLP})
    with pytest.raises(CheckpointError, match="--allow-module fuzzpkg"):
        ckpt.decode(data)
    assert "fuzzpkg" not in sys.modules  # decided before importing
    assert ckpt.decode(data, allow_modules=["fuzzpkg"]).model is not None
    monkeypatch.setenv(entrypoints.ENV, "other, fuzzpkg")
    assert ckpt.decode(data).model is not None
    monkeypatch.delenv(entrypoints.ENV)
    for fn, kw in [("system", {"command": f"touch {marker}"}), ("reexported", MLP)]:
        bad = _with_model(BASES["q-qs"], {"entrypoint": f"fuzzpkg:{fn}", "kwargs": kw})
        with pytest.raises(CheckpointError, match="not defined under the allowed"):
            ckpt.decode(bad, allow_modules=["fuzzpkg"])
    assert not marker.exists()
    # the caller's own model: nothing is imported
    entry = _with_model(BASES["q-qs"], {"entrypoint": "nowhere.at.all:net", "kwargs": {}})
    assert ckpt.decode(entry, model=digits_mlp(**MLP)).model is not None


def test_evaluate_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    from service.cli import app

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.sparq"
    bad.write_bytes(
        _with_model(
            BASES["q-qs"], {"entrypoint": "os:system", "kwargs": {"command": f"touch {marker}"}}
        )
    )
    trunc = tmp_path / "trunc.sparq"
    trunc.write_bytes(BASES["q-qs"][:100])
    runner = CliRunner()
    for path, want in [
        (bad, "is never allowed"),
        (trunc, "checkpoint"),
        (tmp_path / "missing.sparq", "no checkpoint file"),
    ]:
        r = runner.invoke(app, ["evaluate", str(path), "--allow-module", "os"])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1, r.output
        assert lines[0].startswith("error:"), r.output
        assert want in lines[0], r.output
        assert "Traceback" not in r.output
    assert not marker.exists()


def test_the_element_budget_bounds_what_a_tiny_file_decodes_to() -> None:
    # an all-zero index-coded layer is legitimately 6 bytes for any size: the budget
    # (MAX_FREE_ELEMENTS + 32 a byte) is what bounds it
    budget = safety.MAX_FREE_ELEMENTS
    header = {
        "model": SPEC.model_dump(mode="json"),
        "tensors": [["0.weight", [budget], "fsr", 32, 6]],
    }
    data = _join(header, struct.pack("<BBI", 1, 0, 0))
    assert "does not fit" in _load(data)  # decoded (4 MiB of zeros), then refused by the model
    header["tensors"][0][1] = [budget + 40 * len(data)]
    assert "elements" in _load(_join(header, struct.pack("<BBI", 1, 0, 0)))
