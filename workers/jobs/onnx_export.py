"""ONNX export of a compressed checkpoint: an int8 QDQ model for onnxruntime.

- Weights: every quantized layer's weight becomes an ``int8`` initializer holding the
  checkpoint's integer codes, with its fp16-exact per-channel scales, behind a
  ``DequantizeLinear`` (``axis`` = the output-channel axis of the initializer as the
  exporter laid it out). Sub-8-bit layers keep their codes in the clipped range
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` inside int8, so the dequantized weight is exactly
  the checkpoint's. Pruned channels are absent (the exported module is the pruned one);
  unstructured and N:M zeros are zeros in the codes.
- Activations (``activations=True``): the data input of every Conv/Gemm/MatMul that
  reads a quantized weight goes through ``QuantizeLinear``/``DequantizeLinear``, int8
  symmetric per tensor, its scale calibrated as ``max|x| / 127`` over the given inputs.
  This is the part that makes onnxruntime's outputs differ from torch's (which does not
  quantize activations); :data:`ACTIVATION_TOLERANCE` states the bound the export
  checks, relative to the largest torch output magnitude. Weight-only export
  (``activations=False``) matches torch to float rounding (:data:`WEIGHT_TOLERANCE`)
  when onnxruntime runs the graph as written (basic optimizations); with all
  optimizations it fuses DequantizeLinear+MatMul into integer kernels that quantize
  activations on the fly; that run is measured and reported (``rel_diff_optimized``),
  not enforced: its integer kernels are the runtime's choice and, on x86 CPUs without
  VNNI, can saturate with full-range 8-bit weights.

The float graph comes from ``torch.onnx.export`` (the TorchScript exporter, opset 17,
batch dimension dynamic, batch norm kept as its own node so weights stay integer).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.codec.bits import dequantize
from workers.compress.engine import COMPRESSIBLE, quantize
from workers.errors import SparqError
from workers.jobs.checkpoint import Checkpoint

OPSET = 17
WEIGHT_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|, weight-only QDQ
ACTIVATION_TOLERANCE = 0.05  # the same with int8 activations

__all__ = ["ACTIVATION_TOLERANCE", "WEIGHT_TOLERANCE", "OnnxReport", "export_qdq"]


class OnnxExportError(SparqError):
    """The model cannot be exported, or the export does not match torch."""


@dataclass(frozen=True)
class OnnxReport:
    path: str
    size_bytes: int
    quantized_weights: int  # weights stored as int8 codes behind DequantizeLinear
    quantized_activations: int  # activation QDQ pairs
    rel_diff: float  # max |onnx - torch| / max |torch|, graph semantics (basic optimizations)
    rel_diff_optimized: float  # the same with onnxruntime's integer-kernel fusions
    tolerance: float  # the bound ``rel_diff`` was checked against
    top1_agreement: float


def _float_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (example,),
        buf,  # type: ignore[arg-type]  # a file-like object is accepted
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE,  # no BN folding: weights stay codes
        do_constant_folding=True,
    )
    return buf.getvalue()


def _layer_codes(
    model: nn.Module, bits: dict[str, int]
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, codes, scale)`` for every quantized layer; the codes reproduce the
    checkpoint's dequantized weight exactly."""
    out = []
    for name, module in model.named_modules():
        b = bits.get(name, 32)
        if not isinstance(module, COMPRESSIBLE) or b > 8:
            continue
        w = module.weight.detach()
        q, scale = quantize(w, b)
        if not torch.equal(dequantize(q, scale), w):
            raise OnnxExportError(f"layer {name!r}: weight is not int{b} codes times its scales")
        out.append((name, q.numpy().astype(np.int8), scale.numpy().astype(np.float32)))
    return out


def _find(
    inits: dict[str, np.ndarray], w: np.ndarray, used: set[str]
) -> tuple[str, int, tuple[int, ...] | None] | None:
    """The initializer holding ``w``: ``(name, channel axis, its shape)``, the shape
    ``None`` when it is ``w`` transposed.

    Either ``w`` itself, its transpose, or ``w`` behind leading unit dimensions (an
    embedding looked up with every index, ``pos(arange(n)).unsqueeze(0)``, is folded
    by the exporter into one such constant)."""
    for name, arr in inits.items():
        if name in used or arr.dtype != np.float32:
            continue
        if arr.shape == w.shape and np.array_equal(arr, w):
            return name, 0, w.shape
        if w.ndim == 2 and arr.shape == w.T.shape and np.array_equal(arr, w.T):
            return name, 1, None
        lead = arr.ndim - w.ndim
        if (
            lead > 0
            and arr.shape[:lead] == (1,) * lead
            and arr.shape[lead:] == w.shape
            and np.array_equal(arr.reshape(w.shape), w)
        ):
            return name, lead, arr.shape
    return None


def exportable(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``inputs`` if the model can be exported as sparq's ONNX graph (one tensor in,
    one tensor out); :class:`OnnxExportError` saying why not otherwise."""
    from workers.compress import batch as B

    if not isinstance(inputs, torch.Tensor):
        keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise OnnxExportError(
            f"cannot export to ONNX: the model takes keyword inputs {keys}, and the int8 "
            "QDQ export takes a model called with one tensor; export `sparq` only "
            "(export.formats: [sparq]) or wrap the model to take one tensor"
        )
    with torch.no_grad():
        out = B.call(model.eval(), inputs[:1])
    if not isinstance(out, torch.Tensor):
        raise OnnxExportError(
            f"cannot export to ONNX: the model returns {type(out).__name__}, and the int8 "
            "QDQ export compares one output tensor; export `sparq` only or wrap the model "
            "to return its output tensor"
        )
    return inputs


def export_qdq(
    ck: Checkpoint,
    out: str | Path,
    inputs: Any,
    *,
    activations: bool = True,
) -> OnnxReport:
    """Write ``ck`` as an int8 QDQ ONNX model and check it against torch on ``inputs``.

    Raises :class:`OnnxExportError` when the model cannot be exported (keyword inputs,
    a structured output, an operator the exporter refuses: the reason is said) or
    when onnxruntime's outputs are further from torch's than the stated tolerance.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = ck.model.eval()
    inputs = exportable(model, inputs)
    bits = {n: lp.bits for n, lp in ck.policy.layers.items()} if ck.policy else {}
    try:
        graph_bytes = _float_onnx(model, inputs[:1])
    except Exception as e:
        raise OnnxExportError(
            f"cannot export to ONNX: torch.onnx.export refused the model "
            f"({type(e).__name__}: {' '.join(str(e).split())[:400]})"
        ) from e
    proto = onnx.load_from_string(graph_bytes)
    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    used: set[str] = set()
    matches: list[tuple[str, int, np.ndarray, np.ndarray]] = []  # name, axis, codes, scale
    for name, codes, scale in _layer_codes(model, bits):
        weight = model.get_submodule(name).weight
        if not isinstance(weight, torch.Tensor):
            continue
        found = _find(inits, weight.detach().numpy(), used)
        if found is None:
            continue  # folded into another op by the exporter: left float (not counted)
        used.add(found[0])
        layout = found[2]  # the initializer's layout of the codes
        codes = codes.T if layout is None else codes.reshape(layout)
        matches.append((found[0], found[1], codes, scale))
    act_inputs: list[str] = []
    if activations:
        for node in g.node:
            if node.op_type in ("Conv", "Gemm", "MatMul") and any(i in used for i in node.input):
                data = [i for i in node.input[:2] if i not in used]
                if data and data[0] not in act_inputs:
                    act_inputs.append(data[0])
    scales = _calibrate(proto, act_inputs, inputs) if act_inputs else {}

    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    for init_name, axis, codes, scale in matches:
        safe = init_name.replace(":", "_")
        new_inits += [
            numpy_helper.from_array(np.ascontiguousarray(codes), f"{safe}_q"),
            numpy_helper.from_array(scale, f"{safe}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), f"{safe}_zp"),
        ]
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{safe}_q", f"{safe}_scale", f"{safe}_zp"],
                [init_name],
                name=f"{safe}_dq",
                axis=axis,
            )
        )
    rename: dict[str, str] = {}
    for t in act_inputs:
        s = np.float32(max(scales[t], 1e-8) / 127.0)
        safe = t.replace(":", "_").replace("/", "_")
        new_inits += [
            numpy_helper.from_array(np.array(s, dtype=np.float32), f"{safe}_ascale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), f"{safe}_azp"),
        ]
        new_nodes += [
            helper.make_node(
                "QuantizeLinear", [t, f"{safe}_ascale", f"{safe}_azp"], [f"{safe}_aq"]
            ),
            helper.make_node(
                "DequantizeLinear", [f"{safe}_aq", f"{safe}_ascale", f"{safe}_azp"], [f"{safe}_adq"]
            ),
        ]
        rename[t] = f"{safe}_adq"
    for node in g.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and any(i in used for i in node.input):
            for j in range(min(2, len(node.input))):
                if node.input[j] in rename:
                    node.input[j] = rename[node.input[j]]
    kept = [i for i in g.initializer if i.name not in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + nodes)
    _topological_sort(g)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    Path(out).write_bytes(data)

    with torch.no_grad():
        want = model(inputs).numpy()
    scale_out = max(float(np.abs(want).max()), 1e-12)
    rel = {}
    got = want
    for level in ("all", "basic"):  # got ends as the graph-semantics run
        got = _run(data, inputs, level)
        rel[level] = float(np.abs(got - want).max()) / scale_out
    # "basic" keeps the QDQ graph's own semantics: that is what the tolerance is checked
    # on. "all" lets onnxruntime fuse QDQ into integer kernels (on x86 without VNNI its
    # u8s8 kernels can saturate int16 sums with 8-bit weights): measured and reported.
    tol = ACTIVATION_TOLERANCE if act_inputs else WEIGHT_TOLERANCE
    if rel["basic"] > tol:
        raise OnnxExportError(
            f"onnxruntime differs from torch by {rel['basic']:.3g} of the largest output "
            f"magnitude > tolerance {tol}"
        )
    return OnnxReport(
        path=str(out),
        size_bytes=len(data),
        quantized_weights=len(used),
        quantized_activations=len(act_inputs),
        rel_diff=rel["basic"],
        rel_diff_optimized=rel["all"],
        tolerance=tol,
        top1_agreement=float((got.argmax(-1) == want.argmax(-1)).mean()),
    )


def _run(data: bytes, inputs: torch.Tensor, level: str) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if level == "basic"
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": inputs.numpy()})[0])


def _calibrate(proto: Any, names: list[str], inputs: torch.Tensor) -> dict[str, float]:
    """``max |x|`` of each named tensor over the inputs, from the float graph."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.node[:]
    probe.graph.node.extend(proto.graph.node)
    for n in names:
        probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(names, {"input": inputs.numpy()})
    return {n: float(np.abs(o).max()) for n, o in zip(names, outs, strict=True)}


def _topological_sort(g: Any) -> None:
    """Order nodes so every input is produced before use (the DQ nodes go first)."""
    produced = {i.name for i in g.initializer} | {i.name for i in g.input} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        progress = False
        rest = []
        for node in pending:
            if all(i in produced for i in node.input):
                ordered.append(node)
                produced.update(node.output)
                progress = True
            else:
                rest.append(node)
        pending = rest
        if not progress:
            raise OnnxExportError(f"the exported graph has a cycle or a missing input: {rest[0]}")
    del g.node[:]
    g.node.extend(ordered)
