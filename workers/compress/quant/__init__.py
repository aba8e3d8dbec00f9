"""Compression methods selectable by ``Policy.method`` (pure torch, no Ray).

Each method is a config class in ``search_spaces/methods/`` and a handler here,
registered for that config type (``register_handler``): ``quant_noise``
(:mod:`workers.compress.quant.quant_noise`, the default), ``ipq``
(:mod:`workers.compress.quant.ipq`), ``mx`` / ``bfp``
(:mod:`workers.compress.quant.blockfmt`), ``geta`` (:mod:`workers.compress.quant.geta`),
and whatever else a module of this package registers: every module is imported
(``pkgutil``), so adding a method needs no list here. :func:`apply` and
:func:`finetune` dispatch on the type of ``policy.method``.

Any of them can add activation quantization (``act_bits`` < 32,
:mod:`workers.compress.quant.actquant`); :func:`count_bops` measures the cost.
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from workers.compress.train import Teacher

from search_spaces import Policy
from search_spaces._policy import FLOAT_BITS
from search_spaces.methods import METHODS
from workers.compress.batch import split
from workers.compress.engine import compressible_layers, tied_layers
from workers.compress.quant import actquant
from workers.compress.quant._common import (
    BOUNDS,
    DECODERS,
    HANDLERS,
    FloatWeight,
    MethodHandler,
    Schedule,
    WeightQuantizer,
    handler_for,
    parametrization,
    register_handler,
    weight,
)
from workers.compress.quant.bops import Bops, count_bops

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
_missing = sorted(n for n, c in METHODS.items() if c not in HANDLERS)
if _missing:
    raise ImportError(f"methods {_missing} have a config but no handler in workers/compress/quant/")

__all__ = [
    "BOUNDS",
    "DECODERS",
    "HANDLERS",
    "Bops",
    "FloatWeight",
    "MethodHandler",
    "Schedule",
    "WeightQuantizer",
    "apply",
    "count_bops",
    "finetune",
    "register_handler",
]

CALIBRATION_BATCHES = 4


def apply(model: nn.Module, policy: Policy) -> nn.Module:
    """Attach the policy's method to every layer it names (in place): its handler
    wraps the quantized layers, :class:`FloatWeight` the float ones."""
    known = {info.name for info in compressible_layers(model)}
    unknown = sorted(set(policy.layers) - known)
    if unknown:
        raise ValueError(f"policy names layers the model does not have: {unknown}")
    tied = tied_layers(model)  # before wrapping: shared weights are still one parameter
    handler = handler_for(policy.method)
    quantized = [n for n, lp in policy.layers.items() if lp.bits != FLOAT_BITS]
    handler.prepare(model, policy, quantized)
    for name, lp in policy.layers.items():
        module = model.get_submodule(name)
        w = weight(module)
        pm: nn.Module | None
        if lp.bits == FLOAT_BITS:
            pm = FloatWeight(w, sparsity=lp.sparsity, kind=lp.kind, layer=name)
        else:
            pm = handler.wrap(w, lp, policy, name)
        if pm is not None:
            parametrize.register_parametrization(module, "weight", pm)
    for alias, source in tied.items():  # a tied layer computes its source's weight
        src = model.get_submodule(source)
        if parametrize.is_parametrized(src, "weight"):
            shared = parametrization(src)
            if shared is not None:
                alias_module = model.get_submodule(alias)
                parametrize.register_parametrization(alias_module, "weight", shared)
    if policy.act_bits != FLOAT_BITS:
        # inputs of Linear/Conv2d only: an Embedding's input is indices
        arith = [
            n for n in policy.layers if isinstance(model.get_submodule(n), nn.Linear | nn.Conv2d)
        ]
        actquant.attach(model, arith, policy.act_bits, policy.act_range)
    return model


def finetune(
    model: nn.Module,
    policy: Policy,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
    seed: int = 0,
    task: str = "classification",
    teacher: Teacher | None = None,
    lr_schedule: str = "cosine",
) -> dict[str, Any]:
    """Train the wrapped model as its method prescribes; returns what it learned
    (``ipq_stages``, or GETA's ``geta_trace``). ``teacher``: a distillation job's float
    model; ``lr_schedule``: ``workers.compress.train.LrSchedule``."""
    model.to(device)
    if policy.act_bits != FLOAT_BITS:
        actquant.calibrate(
            model,
            (split(item).inputs for item in itertools.islice(loader, CALIBRATION_BATCHES)),
            device,
        )
    schedule = Schedule(loader, epochs, lr, device, on_epoch, seed, task, teacher, lr_schedule)
    return handler_for(policy.method).finetune(model, policy, schedule)
