"""Structured channel pruning on any network, through Torch-Pruning's dependency graph.

DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023) traces
the model once and groups the layers whose channels are coupled: the two sides of a
residual add, the inputs of a concatenation, normalization layers, depthwise
convolutions, the embedding dimension of multi-head attention. A group is removed
as a whole, so no layer is ever left with a mismatched shape and the pruned module is
physically smaller.

sparq wraps it behind its own small API:

- :func:`analyze` lists the prunable groups (named after their first layer in module
  order) and every compressible layer left dense, with the reason. A group is only
  called prunable after a trial removal of one channel on a copy of the model runs
  forward and keeps the output shape; anything else is reported, never a crash.
- :func:`prune_channels` removes a fraction of each group's channels, chosen by the
  group's L2 magnitude (all coupled layers together), and returns the pruning record:
  ``[{"group": name, "idxs": [...]}, ...]``.
- :func:`replay` applies a record to a freshly built model (how a checkpoint is
  loaded): the same channels are removed in the same order.

Quantizers follow the surviving channels (the quantization-aware dependency graph of
GETA, Qu et al., CVPR 2025): pruning runs on the float module before the
quantization parametrizations are attached, so the graph and its groups are those of
the float network, and per-channel scales and masks exist only for the channels that
survive.

Attention: when a group carries the embedding dimension of a ``MultiheadAttention``,
the same number of channels is removed from every head (and the count is rounded down
to a multiple of the number of heads), so the heads keep equal widths and each
surviving channel stays in its head.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.compress.batch import Inputs, forward, output_of
from workers.compress.engine import COMPRESSIBLE, tied_layers

__all__ = ["GroupReport", "PruningReport", "analyze", "count_params", "prune_channels", "replay"]


@dataclass(frozen=True)
class GroupReport:
    name: str
    channels: int
    layers: list[str]  # compressible layers whose weights this group slices
    heads: int = 1  # > 1: the group is an attention embedding dimension


@dataclass(frozen=True)
class PruningReport:
    groups: list[GroupReport]
    dense: dict[str, str] = field(default_factory=dict)  # layer -> why it is left dense

    def as_dict(self) -> dict[str, Any]:
        return {
            "groups": [g.__dict__ for g in self.groups],
            "dense": dict(self.dense),
        }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _graph(model: nn.Module, example: Inputs) -> Any:
    """torch-pruning's dependency graph, traced with the example as the model takes it
    (keyword arguments for a mapping) from the output :mod:`.batch` compares."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # the graph is traced through autograd
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example, output_transform=lambda out: output_of(out)[1]
            )
    finally:
        model.train(was_training)


def _out_pruner(dg: Any, module: nn.Module) -> Any:
    pruner = dg.get_pruner_of_module(module)
    return None if pruner is None else pruner.prune_out_channels


def _members(group: Any) -> list[nn.Module]:
    return [item.dep.target.module for item in group]


def _covered(group: Any, model: nn.Module) -> list[str]:
    """Compressible layers whose weight the group slices (including those inside a
    member such as ``MultiheadAttention.out_proj``). Members that are bare parameters
    (torch-pruning slices them with the group) hold no layer."""
    names = _names(model)
    out: list[str] = []
    for item in group:
        m = item.dep.target.module
        handler = getattr(item.dep.handler, "__name__", "")
        depthwise = isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
        if "out_channels" not in handler and not depthwise:
            continue  # only its inputs are sliced: the layer is still the root of its own group
        if not isinstance(m, nn.Module):
            continue  # a bare parameter (a class token, position embeddings): no layer
        for sub in m.modules():
            if isinstance(sub, COMPRESSIBLE) and names.get(sub) is not None:
                name = names[sub]
                if name not in out:
                    out.append(name)
    return out


def _heads(group: Any, channels: int) -> int:
    heads = 1
    for m in _members(group):
        if isinstance(m, nn.MultiheadAttention) and m.embed_dim == channels:
            heads = max(heads, m.num_heads)
    return heads


def _forward_shape(model: nn.Module, example: Inputs) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        out = forward(model, example)
    return tuple(out.shape)


def _channels(module: nn.Module) -> int:
    """The channels torch-pruning's out-channel pruner removes from ``module``: the
    rows of a Linear or Conv2d weight, but the columns of an Embedding's (its
    ``embedding_dim``; its rows are the vocabulary, which no group prunes)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return int(weight.shape[1] if isinstance(module, nn.Embedding) else weight.shape[0])


def analyze(model: nn.Module, example: Inputs) -> PruningReport:
    """The prunable groups of a float model and the layers left dense, with reasons.

    Never raises for a network it cannot prune: the whole network is then reported
    dense with the tracing error as the reason.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]
    dense: dict[str, str] = {}
    try:
        want = _forward_shape(model, example)
        dg = _graph(model, example)
    except Exception as e:  # a model torch-pruning cannot trace stays dense, with the reason
        reason = f"dependency graph could not be traced ({type(e).__name__}: {e})"
        return PruningReport(groups=[], dense={n: reason for n, _ in layers})
    groups: list[GroupReport] = []
    covered: set[str] = set()
    for name, module in layers:
        if name in covered:
            continue
        pruner = _out_pruner(dg, module)
        if pruner is None or module not in dg.module2node:
            dense[name] = (
                "not a node of the traced graph: its weight is used inside another module's "
                "forward (e.g. attention's out_proj, pruned with that module's group), or "
                "torch-pruning's trace does not reach it (its output leaves autograd: a "
                "detach, a numpy or other non-torch call)"
            )
            continue
        n_out = _channels(module)
        group = dg.get_pruning_group(module, pruner, idxs=list(range(n_out)))
        members = _covered(group, model)
        why = _trial_prune(model, example, name, n_out, _heads(group, n_out), want)
        if why:
            dense[name] = why
            continue
        covered.update(members)
        heads = _heads(group, n_out)
        groups.append(GroupReport(name=name, channels=n_out, layers=members, heads=heads))
    for name in list(dense):
        if name in covered:  # e.g. out_proj: sliced with its attention's group after all
            del dense[name]
    return PruningReport(groups=groups, dense=dense)


def _trial_prune(
    model: nn.Module,
    example: Inputs,
    name: str,
    n_out: int,
    heads: int,
    want: tuple[int, ...],
) -> str | None:
    """Why a group cannot be pruned safely, or None: remove one channel (one per head)
    on a copy, then the graph's own check, a forward pass and the output shape."""
    if n_out <= heads:
        return f"only {n_out} output channel(s) for {heads} head(s): nothing can be removed"
    import torch_pruning as tp

    trial = copy.deepcopy(model)
    try:
        dg = _graph(trial, example)
        module = trial.get_submodule(name)
        full = dg.get_pruning_group(module, _out_pruner(dg, module), idxs=list(range(n_out)))
        scores = tp.importance.GroupMagnitudeImportance(p=2)(full)  # what a trial ranks by
        if scores is None or scores.numel() != n_out:
            return "torch-pruning cannot score the group's channels (a layer it cannot weigh)"
    except Exception as e:
        return f"torch-pruning cannot score the group's channels ({type(e).__name__}: {e})"
    try:
        width = n_out // heads
        idxs = [h * width for h in range(heads)]
        group = dg.get_pruning_group(module, _out_pruner(dg, module), idxs=idxs)
        if not dg.check_pruning_group(group):
            return (
                "the dependency graph refuses the group (a coupled layer would lose all channels)"
            )
        group.prune()
        got = _forward_shape(trial, example)
    except Exception as e:
        return f"removing a channel breaks the network ({type(e).__name__}: {e})"
    if got != want:
        return (
            f"its channels reach the network's output: pruning changes the output shape "
            f"from {list(want)} to {list(got)}"
        )
    return None


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Share the weights that were shared before pruning again: torch-pruning gives
    each member of a group a new, sliced parameter, so a head tied to its embedding
    would otherwise come out with a copy of its own."""
    for alias, source in tied.items():
        a, s = model.get_submodule(alias), model.get_submodule(source)
        aw, sw = a.weight, s.weight
        if aw is not sw:
            if not (isinstance(aw, torch.Tensor) and isinstance(sw, torch.Tensor)):
                raise TypeError(f"tied layers {alias} and {source} hold no weight tensors")
            if aw.shape != sw.shape or not torch.equal(aw, sw):
                raise ValueError(f"pruning sliced tied weights {alias} and {source} differently")
            a.weight = sw


def _step(channels: int, heads: int, multiple_of: int) -> int:
    """Channels are removed in multiples of this: the head count (heads keep equal
    widths) and ``multiple_of`` (4 by default) when the width is a multiple of it, so
    layers fed by the group keep a reduction dimension that N:M groups (M = 4) and
    Quant-Noise blocks still tile."""
    both = math.lcm(heads, multiple_of)
    return both if channels % both == 0 else heads


def _select(scores: torch.Tensor, fraction: float, heads: int, multiple_of: int = 4) -> list[int]:
    """The ``round(fraction * channels)`` lowest-importance channels, rounded down to a
    multiple of :func:`_step` (the same count in each head); at least one step of
    channels survives."""
    n = scores.numel()
    step = _step(n, heads, multiple_of)
    k = min(n - step, (round(fraction * n) // step) * step)
    if k <= 0:
        return []
    width, k_head = n // heads, k // heads
    idxs: list[int] = []
    for h in range(heads):
        part = scores[h * width : (h + 1) * width]
        low = torch.topk(part, k_head, largest=False, sorted=False).indices + h * width
        idxs += low.tolist()
    return sorted(idxs)


def prune_channels(
    model: nn.Module,
    fractions: dict[str, float],
    example: Inputs,
    *,
    multiple_of: int = 4,
    report: PruningReport | None = None,
) -> list[dict[str, Any]]:
    """Remove ``fractions[group]`` of each named group's channels, in place.

    Returns the pruning record (replayable with :func:`replay`). Groups are looked up
    by name in :func:`analyze`'s report (pass ``report`` to reuse one); a name that is
    not a prunable group is an error naming the groups that are.
    """
    import torch_pruning as tp

    wanted = {g: f for g, f in fractions.items() if f > 0}
    if not wanted:
        return []
    report = report or analyze(model, example)
    by_name = {g.name: g for g in report.groups}
    unknown = sorted(set(wanted) - set(by_name))
    if unknown:
        raise ValueError(
            f"policy.channels names {unknown}, which are not prunable groups of this model; "
            f"prunable groups: {sorted(by_name)}"
        )
    tied = tied_layers(model)
    dg = _graph(model, example)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    record: list[dict[str, Any]] = []
    for name, info in by_name.items():
        if name not in wanted:
            continue
        module = model.get_submodule(name)
        n_out = _channels(module)
        group = dg.get_pruning_group(module, _out_pruner(dg, module), idxs=list(range(n_out)))
        scores = importance(group)
        idxs = _select(scores.detach().float().cpu(), wanted[name], info.heads, multiple_of)
        if not idxs:
            continue
        group = dg.get_pruning_group(module, _out_pruner(dg, module), idxs=idxs)
        group.prune()
        record.append({"group": name, "idxs": idxs})
    _retie(model, tied)
    return record


def replay(model: nn.Module, record: list[dict[str, Any]], example: Inputs) -> nn.Module:
    """Apply a pruning record to a freshly built model (same channels, same order)."""
    if not record:
        return model
    tied = tied_layers(model)
    dg = _graph(model, example)
    for step in record:
        try:
            module = model.get_submodule(str(step["group"]))
        except AttributeError as e:
            raise ValueError(f"pruning record names {step['group']!r}, not in the model") from e
        group = dg.get_pruning_group(module, _out_pruner(dg, module), idxs=list(step["idxs"]))
        group.prune()
    _retie(model, tied)
    return model
