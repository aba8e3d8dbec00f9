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


def build_model(spec: ModelSpec, allowed: tuple[str, ...] | None = None) -> nn.Module:
    """Instantiate the model a spec names (float, untrained weights)."""
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
    return model
