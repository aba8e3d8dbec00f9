"""Networks that use torch in ways the engine's layer-by-layer view does not cover
(issue 14, item 1): weights tied between an embedding and an LM head, layers called
through ``torch.nn.functional`` on bare parameters, a custom module with its own
weight, and a network torch-pruning cannot trace. Entrypoints for the tests
(``tests.odd_nets:...``); every one must end in a succeeded trial with what it could
not compress said and why."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class TiedLM(nn.Module):
    """A character LM whose read-out is its embedding transposed (GPT-2's tying)."""

    def __init__(self, vocab: int = 128, dim: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x)
        h = h + torch.relu(self.mix(h))
        return self.head(self.norm(h))


class FunctionalNet(nn.Module):
    """A digits classifier whose first layer is ``F.linear`` on bare parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(48, 64) * 0.1)
        self.b1 = nn.Parameter(torch.zeros(48))
        self.fc = nn.Linear(48, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x.flatten(1), self.w1, self.b1))
        return self.out(F.relu(self.fc(h)))


class ScaledLinear(nn.Module):
    """A custom layer: its own weight and a learned output scale."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * n_in**-0.5)
        self.scale = nn.Parameter(torch.ones(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.t()) * self.scale


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 48)
        self.custom = ScaledLinear(48, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.custom(torch.relu(self.inp(x.flatten(1))))))


class _Round(torch.autograd.Function):
    """A custom autograd op (straight-through rounding) torch-pruning has no rule for."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


class UntraceableNet(nn.Module):
    """A network torch-pruning's trace cannot follow through: its first layer's output
    goes through numpy (a non-torch library call), then a custom autograd op, and the
    forward branches on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.flatten(1)))
        # a feature step through numpy: no gradient reaches `a` (a frozen feature
        # extractor), and torch-pruning's trace stops here
        h = torch.from_numpy(np.round(h.detach().cpu().numpy(), 4)).to(h.device)
        h = _Round.apply(h)
        if bool(h.sum() > -1e9):  # data-dependent control flow
            h = h + torch.relu(self.b(h))
        return self.out(h)


def tied_lm() -> nn.Module:
    return TiedLM()


def functional_net() -> nn.Module:
    return FunctionalNet()


def custom_net() -> nn.Module:
    return CustomNet()


def untraceable_net() -> nn.Module:
    return UntraceableNet()
