"""A batch as users hold it: every loop that feeds a model (training, evaluation, the
baseline, trials, re-evaluation, calibration, BOPs, the dependency graph, ONNX) goes
through these few functions, so a model that takes a dict of tensors and returns a
``ModelOutput`` is used as it is, without a wrapper.

Dataset items (and so the batches a ``DataLoader`` collates from them) may be

- a tensor: inputs only (unlabelled: what ``distillation`` trains on);
- a tuple or list ``(inputs, labels, ...)``: the first element is the input, the
  second the labels (a 1-tuple is inputs only);
- a mapping of tensors (``input_ids``, ``attention_mask``, ``pixel_values``, ...): the
  model is called with it as keyword arguments; ``labels`` (or ``label``) is split off
  and is the target, never passed to the model.

A model's output may be a tensor, a tuple or list (its first tensor), or a mapping /
transformers ``ModelOutput`` (an ordered dict): the first of :data:`OUTPUT_KEYS` it
holds, else its first tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.errors import SpecError

LABEL_KEYS = ("labels", "label")
# what a model's output is taken to be, in this order (transformers' names)
OUTPUT_KEYS = ("logits", "sentence_embedding", "last_hidden_state", "pooler_output")

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One batch split into what the model takes and the labels (None: unlabelled)."""

    inputs: Inputs
    labels: torch.Tensor | None

    def to(self, device: torch.device) -> Batch:
        return Batch(to_device(self.inputs, device), to_device(self.labels, device))

    @property
    def size(self) -> int:
        """Samples in the batch (the first dimension of its first tensor)."""
        return int(first_tensor(self.inputs).shape[0])

    @property
    def attention_mask(self) -> torch.Tensor | None:
        if isinstance(self.inputs, dict):
            return self.inputs.get("attention_mask")
        return None


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors moved to ``device``, inside mappings, tuples and lists too."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def first_tensor(obj: Any) -> torch.Tensor:
    """The first tensor of a tensor, mapping or sequence (depth first)."""
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, Sequence) or isinstance(obj, Mapping):
        for v in values:
            try:
                return first_tensor(v)
            except TypeError:
                continue
    raise TypeError(f"no tensor in {type(obj).__name__}")


def _inputs(x: Any, where: str) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        bad = [k for k, v in x.items() if not isinstance(v, torch.Tensor)]
        if bad or not x:
            raise SpecError(
                f"{where}: a mapping input must hold tensors only (keyword arguments of the "
                f"model), but {bad or 'nothing'} is not"
            )
        return {str(k): v for k, v in x.items()}
    raise SpecError(
        f"{where}: inputs must be a tensor or a mapping of tensors, not {type(x).__name__}"
    )


def split(item: Any, where: str = "dataset item") -> Batch:
    """A dataset item or collated batch as :class:`Batch` (see the module docstring)."""
    if isinstance(item, Mapping):
        labels = next((item[k] for k in LABEL_KEYS if k in item), None)
        rest = {k: v for k, v in item.items() if k not in LABEL_KEYS}
        return Batch(_inputs(rest, where), labels if isinstance(labels, torch.Tensor) else None)
    if isinstance(item, list | tuple):
        if not item:
            raise SpecError(f"{where}: an empty {type(item).__name__}")
        y = item[1] if len(item) > 1 else None
        if y is not None and not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        return Batch(_inputs(item[0], where), y)
    return Batch(_inputs(item, where), None)


def call(model: nn.Module, inputs: Inputs) -> Any:
    """The model called with ``inputs`` as it takes them: keyword arguments for a
    mapping, one positional tensor otherwise."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def output_of(out: Any) -> tuple[str, torch.Tensor]:
    """``(name, tensor)``: which output of the model is compared (see the module
    docstring); the name is the key it was found under, ``"output"`` for a tensor."""
    if isinstance(out, torch.Tensor):
        return "output", out
    if isinstance(out, Mapping):
        for key in OUTPUT_KEYS:
            v = out.get(key)
            if isinstance(v, torch.Tensor):
                return key, v
        for key, v in out.items():
            if isinstance(v, torch.Tensor):
                return str(key), v
    elif isinstance(out, list | tuple):
        for v in out:
            if isinstance(v, torch.Tensor):
                return "output", v
    raise TypeError(f"the model returned {type(out).__name__} holding no tensor output")


def forward(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The model's output tensor for ``inputs`` (:func:`call`, then :func:`output_of`)."""
    return output_of(call(model, inputs))[1]


def example(ds: Any) -> Inputs:
    """The inputs of the dataset's first item as a batch of one: what the dependency
    graph is traced with, the BOPs counted on and the checkpoint's ``example`` is."""
    inputs = split(ds[0], "dataset item 0").inputs
    if isinstance(inputs, dict):
        return {k: v.unsqueeze(0) for k, v in inputs.items()}
    return inputs.unsqueeze(0)


def describe_example(ex: Inputs) -> dict[str, Any]:
    """The example's shapes and dtypes for a checkpoint header: ``{shape, dtype}`` for a
    tensor (as before inputs could be mappings), ``{inputs: {key: {shape, dtype}}}``."""

    def one(t: torch.Tensor) -> dict[str, Any]:
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}

    if isinstance(ex, dict):
        return {"inputs": {k: one(v) for k, v in ex.items()}}
    return one(ex)


def rebuild_example(desc: Mapping[str, Any]) -> Inputs:
    """An input of the shapes :func:`describe_example` wrote (zeros; an attention mask
    of ones), to trace the dependency graph again when a checkpoint is loaded."""

    def one(d: Mapping[str, Any], key: str = "") -> torch.Tensor:
        fill = torch.ones if key == "attention_mask" else torch.zeros
        return fill(list(d["shape"]), dtype=getattr(torch, str(d["dtype"])))

    if "inputs" in desc:
        return {str(k): one(v, str(k)) for k, v in desc["inputs"].items()}
    return one(desc)


def first_n(ds: Any, n: int) -> Inputs:
    """The inputs of the first ``n`` items stacked into one batch (ONNX parity)."""
    items = [split(ds[i], f"dataset item {i}").inputs for i in range(min(n, len(ds)))]
    if isinstance(items[0], dict):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}  # type: ignore[index]
    return torch.stack(items)  # type: ignore[arg-type]


def first_rows(inputs: Inputs, n: int) -> Inputs:
    """The first ``n`` samples of a batch's inputs."""
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]
