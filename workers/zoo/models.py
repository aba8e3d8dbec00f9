"""Builtin models and the resolution of a model spec to an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.spec import BUILTIN_MODELS, ModelSpec
from workers import entrypoints
from workers.errors import SpecError


def digits_mlp(hidden: int = 256, depth: int = 2, num_classes: int = 10) -> nn.Module:
    """A 64-hidden-...-10 MLP over the 8x8 digits images."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def digits_cnn(width: int = 16, num_classes: int = 10) -> nn.Module:
    """A small CNN with batch norm and one residual block, for 1x8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        _Residual(width),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def _builtins() -> dict[str, Callable[..., nn.Module]]:
    from workers.zoo.lm import char_lm
    from workers.zoo.nets import digits_dsconv, digits_transformer

    def minilm() -> nn.Module:  # transformers is imported only when it is built
        from workers.zoo.minilm import minilm as build

        return build()

    return {
        "digits-mlp": digits_mlp,
        "digits-cnn": digits_cnn,
        "digits-dsconv": digits_dsconv,
        "digits-transformer": digits_transformer,
        "char-lm": char_lm,
        "minilm": minilm,
    }


BUILTINS: dict[str, Callable[..., nn.Module]] = _builtins()
if tuple(BUILTINS) != BUILTIN_MODELS:  # the spec's list must name exactly these
    raise RuntimeError(f"builtin models {tuple(BUILTINS)} differ from the spec's {BUILTIN_MODELS}")


def import_entrypoint(
    entrypoint: str, field: str, allowed: tuple[str, ...] | None = None
) -> Callable[..., Any]:
    """Import ``module:function`` if the operator allows it (workers/entrypoints.py:
    checked here, on the worker, before the import, whatever the API checked);
    ``allowed`` defaults to ``$SPARQ_ENTRYPOINT_MODULES``. Errors name the spec field
    and the value."""
    try:
        return entrypoints.load(
            entrypoint, field, entrypoints.allowed_prefixes() if allowed is None else allowed
        )
    except (entrypoints.NotAllowed, ImportError, AttributeError) as e:
        raise SpecError(str(e)) from e


class FromConv1D(nn.Linear):
    """An ``nn.Linear`` standing in for a transformers ``Conv1D`` (GPT-2's attention
    and MLP layers: ``x @ W + b`` with ``W`` stored ``[in, out]``): the same function,
    its weight stored transposed (``[out, in]``, as every Linear), so the engine
    quantizes, prunes and stores it as the Linear it is. A state dict written by the
    original model (``baseline.weights``) is transposed on loading by
    ``workers.jobs.baseline.load_weights``."""


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def linear_layers(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` of ``model`` by an equivalent
    :class:`FromConv1D` (in place; weights, bias, device, dtype and ``requires_grad``
    carried over, a weight shared between layers shared still). Returns the names
    replaced. Without it such a layer is a custom module's weight: kept float32."""
    done: list[str] = []
    made: dict[int, nn.Parameter] = {}  # a Conv1D weight tied elsewhere stays tied
    for name, module in list(model.named_modules()):
        if not name or not _is_conv1d(module):  # the root itself cannot be replaced
            continue
        w = module.weight
        assert isinstance(w, torch.Tensor)  # _is_conv1d
        bias = getattr(module, "bias", None)
        lin = FromConv1D(
            int(w.shape[0]), int(w.shape[1]), bias=bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            if id(w) not in made:
                made[id(w)] = nn.Parameter(
                    w.detach().t().contiguous(), requires_grad=w.requires_grad
                )
            lin.weight = made[id(w)]
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        lin.train(module.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lin)
        done.append(name)
    return done


def build_model(spec: ModelSpec, allowed: tuple[str, ...] | None = None) -> nn.Module:
    """Instantiate the model a spec names (float, untrained weights), with
    transformers ``Conv1D`` layers as the Linears they are (:func:`linear_layers`)."""
    fn = (
        BUILTINS[spec.builtin]
        if spec.builtin
        else import_entrypoint(str(spec.entrypoint), "model.entrypoint", allowed)
    )
    try:
        model = fn(**spec.kwargs)
    except TypeError as e:
        raise SpecError(f"model.kwargs={spec.kwargs!r} rejected by {spec.label}: {e}") from e
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"model {spec.label!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    linear_layers(model)
    return model
