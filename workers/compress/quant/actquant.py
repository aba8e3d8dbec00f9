"""Activation quantization: per-tensor affine int-N (N <= 8) of each compressed
layer's input, with a calibrated range (min/max over a few training batches, then
frozen) or a learned one (initialized by calibration, then trained through the
straight-through round: clipped inputs pass their gradient to the range ends).

``y = lo + s * round((clamp(x, lo, hi) - lo) / s)``, ``s = (hi - lo) / (2^N - 1)``.
The quantizer is a child module ``act_quant`` of the layer, applied by a forward
pre-hook; the checkpoint stores ``[bits, lo, hi]`` per layer in its header and
re-attaches it on load, so a reloaded model computes the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from workers.compress.batch import Inputs, call, to_device
from workers.compress.quant._common import ste_round

ATTR = "act_quant"


class ActQuant(nn.Module):
    def __init__(self, bits: int, mode: str = "calibrated", layer: str = "") -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"layer {layer!r}: act_bits must be in 2..8, but got {bits}")
        if mode not in ("calibrated", "learned"):
            raise ValueError(f"act_range must be 'calibrated' or 'learned', but got {mode!r}")
        self.bits, self.mode, self.layer = bits, mode, layer
        self.calibrating = False
        self.lo: torch.Tensor
        self.hi: torch.Tensor
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.seen = False

    def set_range(self, lo: float, hi: float) -> None:
        dev = self.lo.device
        lo_t, hi_t = torch.tensor(float(lo), device=dev), torch.tensor(float(hi), device=dev)
        if self.mode == "learned":
            del self.lo, self.hi
            self.lo, self.hi = nn.Parameter(lo_t), nn.Parameter(hi_t)
        else:
            self.lo.copy_(lo_t)
            self.hi.copy_(hi_t)
        self.seen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            xlo, xhi = float(x.detach().min()), float(x.detach().max())
            if self.seen:
                xlo, xhi = min(xlo, float(self.lo)), max(xhi, float(self.hi))
            self.lo.data.fill_(xlo)
            self.hi.data.fill_(xhi)
            self.seen = True
            return x
        if not self.seen:
            raise RuntimeError(f"layer {self.layer!r}: activation range used before calibration")
        lo, hi = self.lo, torch.maximum(self.hi, self.lo + 1e-8)
        s = (hi - lo) / (2**self.bits - 1)
        xc = torch.minimum(torch.maximum(x, lo), hi)
        return lo + s * ste_round((xc - lo) / s)


def _hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, ATTR)(args[0]), *args[1:])


def attach(model: nn.Module, names: Iterable[str], bits: int, mode: str) -> list[ActQuant]:
    out = []
    for name in names:
        module = model.get_submodule(name)
        aq = ActQuant(bits, mode, name)
        module.add_module(ATTR, aq)
        module.register_forward_pre_hook(_hook)
        out.append(aq)
    return out


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Inputs], device: torch.device) -> None:
    """Set every quantizer's range to the min/max seen over ``batches`` (eval mode)."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuant)]
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.calibrating = True
    for x in batches:
        call(model, to_device(x, device))
    for q in quantizers:
        q.calibrating = False
        q.set_range(float(q.lo), float(q.hi))
    model.train(was_training)


def header(model: nn.Module) -> dict[str, list[float]]:
    """``{layer: [bits, lo, hi]}`` for the checkpoint header."""
    return {
        m.layer: [m.bits, float(m.lo), float(m.hi)]
        for m in model.modules()
        if isinstance(m, ActQuant)
    }


def restore(model: nn.Module, spec: dict[str, list[float]]) -> None:
    """Re-attach fixed quantizers from a checkpoint header."""
    for name, (bits, lo, hi) in spec.items():
        (aq,) = attach(model, [name], int(bits), "calibrated")
        aq.set_range(lo, hi)


def act_bits(module: nn.Module) -> int:
    aq = getattr(module, ATTR, None)
    return aq.bits if isinstance(aq, ActQuant) else 32
