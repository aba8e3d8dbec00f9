"""GETA: joint structured pruning and quantization with learned bit widths (Qu, ...,
Tianyi Chen, "Automatic Joint Structured Pruning and Quantization", CVPR 2025).

Per layer (per tensor) quantizer with learnable step ``d``, clip range ``q_m`` and
exponent ``t``: ``Q(x) = sign(x) * d * round(min(|x|, q_m)^t / d)``; its bit width is
``b = log2(q_m^t / d + 1) + 1``, so ``d(b) = q_m^t / (2^(b-1) - 1)``. Layers start at
16 bits (``q_m = max|W|``, ``t = 1``). ``d``, ``q_m`` and ``t`` get autograd's exact
gradients through a straight-through round; ``x`` gets a clipped straight-through
gradient.

The optimizer runs four stages counted in steps: warm-up (plain steps); projection
(after each step ``d`` alone is clamped into ``[d(b_u'), d(b_l)]``; the upper bound
``b_u'`` starts at 16 - ``bit_reduction`` and shrinks by ``bit_reduction`` every
projection period down to ``b_u``); joint (each pruning period scores the unmarked
groups, marks the lowest ``K / periods`` and drives them to exactly zero over the
period with a linear forget schedule); cool-down (bits rounded into ``[b_l, b_u]``,
``d`` pinned to ``d(b)``, pruned groups held at zero).

Groups here are plain output channels of each quantized layer (the last layer,
whose outputs are the model's, is never pruned): the structured-pruning issue's
dependency graph had not landed when this was written. The group score is the sum
of min-max normalized magnitude, average magnitude and first/second-order Taylor
terms (the paper's cosine term and its choice of ``d`` for marked groups are left out).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from search_spaces.methods.geta import GetaConfig, GetaSettings
from workers.codec.bits import pack_codes, qmax, unpack_codes
from workers.compress.quant._common import (
    Encodings,
    MethodHandler,
    Schedule,
    WeightQuantizer,
    original,
    parametrization,
    pattern_bound,
    register_handler,
    weight,
)

if TYPE_CHECKING:
    from search_spaces import LayerPolicy, Policy
    from workers.compress.train import Teacher

START_BITS = 16


def d_of_b(qm_t: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """The step that gives ``b`` bits: ``q_m^t / (2^(b-1) - 1)``."""
    return torch.as_tensor(qm_t) / (2.0 ** (torch.as_tensor(b, dtype=torch.float32) - 1) - 1)


def b_of_d(qm_t: torch.Tensor | float, d: torch.Tensor | float) -> torch.Tensor:
    """The bit width of step ``d``: ``log2(q_m^t / d + 1) + 1``."""
    return torch.log2(torch.as_tensor(qm_t) / torch.as_tensor(d) + 1) + 1


class _GetaQ(torch.autograd.Function):
    """``Q(x) = sign(x) d round(min(|x|, q_m)^t / d)`` with the analytic gradients:
    ``dQ/dd = sign(x) (r - u/d)``, ``dQ/dq_m = sign(x) t q_m^(t-1)`` where clipped,
    ``dQ/dt = sign(x) u ln(min(|x|, q_m))``, and a clipped straight-through ``dQ/dx``
    (``u = min(|x|, q_m)^t``, ``r = round(u/d)``; the round is straight-through)."""

    @staticmethod
    def forward(
        ctx: Any, w: torch.Tensor, d: torch.Tensor, qm: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        a = w.abs()
        inside = a < qm
        c = torch.minimum(a, qm).clamp_min(1e-30)
        u = c.pow(t)
        r = torch.round(u / d)
        s = torch.sign(w)
        ctx.save_for_backward(s, inside, r, u, c, d, qm, t)
        return s * d * r

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s, inside, r, u, c, d, qm, t = ctx.saved_tensors
        gs = g * s
        grad_w = g * inside
        grad_d = (gs * (r - u / d)).sum()
        grad_qm = gs.masked_fill(inside, 0).sum() * t * qm.pow(t - 1)
        grad_t = (gs * u * torch.log(c)).sum()
        return grad_w, grad_d, grad_qm, grad_t


class GetaQuant(WeightQuantizer):
    group_mask: torch.Tensor
    d_pinned: torch.Tensor

    def __init__(self, weight: torch.Tensor, *, layer: str = "", prunable: bool = True) -> None:
        super().__init__()
        qm = weight.detach().abs().max().clamp_min(1e-8)
        self.layer, self.prunable = layer, prunable
        self.q_m = nn.Parameter(qm.clone())
        self.t = nn.Parameter(torch.tensor(1.0, device=weight.device))
        # d is learned through its logarithm, so that it stays positive and Adam's steps
        # are relative; "only d is projected" holds for log d the same way.
        self.log_d = nn.Parameter(torch.log(d_of_b(qm, START_BITS)).to(weight.device))
        self.register_buffer("group_mask", torch.ones(weight.shape[0], device=weight.device))
        self.register_buffer("d_pinned", torch.tensor(0.0, device=weight.device))
        self.pinned_bits: int | None = None

    @property
    def d(self) -> torch.Tensor:
        return self.d_pinned if self.pinned_bits is not None else torch.exp(self.log_d)

    def qm_t(self) -> torch.Tensor:
        return self.q_m.abs().clamp_min(1e-8) ** self.t

    def bits(self) -> float:
        return float(b_of_d(self.qm_t().detach(), self.d.detach()))

    def _masked(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.group_mask.view(-1, *([1] * (weight.dim() - 1)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = self._masked(weight)
        return _GetaQ.apply(w, self.d, self.q_m.abs().clamp_min(1e-8), self.t)

    @torch.no_grad()
    def project(self, b_low: float, b_high: float) -> None:
        """Partial projection: only ``d`` is clamped into ``[d(b_high), d(b_low)]``."""
        self.t.clamp_(0.5, 2.0)
        qt = self.qm_t()
        lo, hi = torch.log(d_of_b(qt, b_high)), torch.log(d_of_b(qt, b_low))
        self.log_d.copy_(torch.minimum(torch.maximum(self.log_d, lo), hi))

    @torch.no_grad()
    def pin(self, b_low: int, b_high: int) -> int:
        """Cool-down: round the bit width into range and pin ``d = d(b)``."""
        b = int(min(max(round(self.bits()), b_low), b_high))
        self.d_pinned.copy_(d_of_b(self.qm_t(), b))
        for p in (self.log_d, self.q_m, self.t):
            p.requires_grad_(False)
        self.pinned_bits = b
        return b

    def weight_bits(self) -> float:
        return float(self.pinned_bits) if self.pinned_bits is not None else self.bits()

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        if self.pinned_bits is None:
            raise ValueError(f"layer {self.layer!r}: GETA weights export after cool-down only")
        b = self.pinned_bits
        with torch.no_grad():
            w = self._masked(original.detach().float().cpu())
            qm, t, d = self.q_m.abs().clamp_min(1e-8).cpu(), self.t.cpu(), self.d.cpu()
            r = torch.round(torch.minimum(w.abs(), qm) ** t / d)
            codes = (torch.sign(w) * r + qmax(b)).numpy().astype(np.uint8).reshape(-1)
        head = struct.pack("<f", float(d))
        return "geta", b, head + pack_codes(codes, b, qmax(b))


def _decode_geta(shape: list[int], bits: int, blob: bytes) -> torch.Tensor:
    (d,) = struct.unpack_from("<f", blob)
    codes = unpack_codes(blob[4:], bits, int(np.prod(shape)), qmax(bits))
    signed = torch.from_numpy(codes.astype(np.float32) - qmax(bits)).reshape(shape)
    return torch.sign(signed) * torch.tensor(d, dtype=torch.float32) * signed.abs()


def _bound_geta(shape: list[int], bits: int, blob: bytes) -> float:
    return 32.0 + pattern_bound(_decode_geta(shape, bits, blob), bits)  # one fp32 step


def attach(model: nn.Module, names: list[str]) -> dict[str, GetaQuant]:
    """Attach a GETA quantizer to each named layer; the last one is not prunable."""
    out = {}
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        gq = GetaQuant(weight(module), layer=name, prunable=i < len(names) - 1)
        parametrize.register_parametrization(module, "weight", gq)
        out[name] = gq
    return out


@dataclass
class GetaTrace:
    """Per-step record: stage, the current upper bit bound, every layer's bit width."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    total_groups: int = 0
    target_groups: int = 0
    pruned_groups: int = 0
    final_bits: dict[str, int] = field(default_factory=dict)

    @property
    def group_sparsity(self) -> float:
        return self.pruned_groups / max(1, self.total_groups)


def _stage(step: int, cfg: GetaSettings) -> str:
    edges = [
        ("warmup", cfg.warmup_steps),
        ("projection", cfg.projection_steps),
        ("joint", cfg.joint_steps),
        ("cooldown", cfg.cooldown_steps),
    ]
    for name, n in edges:
        if step < n:
            return name
        step -= n
    return "done"


def _scores(model: nn.Module, quantizers: dict[str, GetaQuant]) -> list[tuple[float, str, int]]:
    """Saliency of every unmarked prunable output channel (lower = more redundant)."""
    terms: list[list[float]] = [[], [], [], []]
    keys: list[tuple[str, int]] = []
    for name, gq in quantizers.items():
        if not gq.prunable:
            continue
        module = model.get_submodule(name)
        w = original(module)
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        wf, gf = w.detach().flatten(1), g.flatten(1)
        gw = (wf * gf).sum(1)
        for c in range(wf.shape[0]):
            if gq.group_mask[c] == 0:
                continue
            keys.append((name, c))
            terms[0].append(float(wf[c].norm()))
            terms[1].append(float(wf[c].abs().mean()))
            terms[2].append(abs(float(gw[c])))
            terms[3].append(0.5 * float(gw[c]) ** 2)
    total = np.zeros(len(keys))
    for t in terms:
        a = np.asarray(t)
        if a.size and a.max() > a.min():
            total += (a - a.min()) / (a.max() - a.min())
    return sorted((float(s), n, c) for s, (n, c) in zip(total, keys, strict=True))


def train(
    model: nn.Module,
    loader: DataLoader,
    quantizers: dict[str, GetaQuant],
    cfg: GetaSettings,
    device: torch.device,
    task: str = "classification",
    teacher: Teacher | None = None,
) -> GetaTrace:
    """Run GETA's four stages on the task's loss; returns the per-step trace."""
    from workers.compress.train import batch_loss

    model.to(device).train()
    if teacher is not None:
        teacher.model.to(device)
    qparams = {id(p) for gq in quantizers.values() for p in (gq.log_d, gq.q_m, gq.t)}
    opt = torch.optim.Adam(
        [
            {"params": [p for p in model.parameters() if id(p) not in qparams], "lr": cfg.lr},
            {
                "params": [p for gq in quantizers.values() for p in (gq.log_d, gq.q_m, gq.t)],
                "lr": cfg.quant_lr,
            },
        ]
    )
    trace = GetaTrace()
    trace.total_groups = sum(
        original(model.get_submodule(n)).shape[0] for n, gq in quantizers.items() if gq.prunable
    )
    trace.target_groups = round(cfg.target_group_sparsity * trace.total_groups)
    total = cfg.warmup_steps + cfg.projection_steps + cfg.joint_steps + cfg.cooldown_steps
    proj_len = math.ceil(cfg.projection_steps / cfg.projection_periods)
    prune_len = cfg.joint_steps // cfg.pruning_periods
    marked: list[tuple[str, int]] = []
    fading: list[tuple[str, int]] = []
    step = 0
    while step < total:
        for item in loader:
            if step >= total:
                break
            stage = _stage(step, cfg)
            if stage == "cooldown" and step == total - cfg.cooldown_steps:
                for gq in quantizers.values():
                    gq.pin(cfg.bit_low, cfg.bit_high)
            loss, _ = batch_loss(model, item, device, task, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            j = step - cfg.warmup_steps - cfg.projection_steps
            if stage == "joint" and j % prune_len == 0 and j // prune_len < cfg.pruning_periods:
                period = j // prune_len
                want = round(trace.target_groups * (period + 1) / cfg.pruning_periods)
                cands = [(n, c) for _, n, c in _scores(model, quantizers)]
                fading = cands[: want - len(marked)]
                marked += fading
            opt.step()
            with torch.no_grad():
                if stage == "joint" and fading:
                    left = prune_len - (j % prune_len)  # steps left in this period
                    factor = 0.0 if left <= 1 else (left - 1) / left
                    for n, c in fading:
                        original(model.get_submodule(n))[c].mul_(factor)
                        if factor == 0.0:
                            quantizers[n].group_mask[c] = 0.0
                    if factor == 0.0:
                        fading = []
            b_high: float = START_BITS
            if stage == "projection":
                p = (step - cfg.warmup_steps) // proj_len
                b_high = max(cfg.bit_high, START_BITS - cfg.bit_reduction * (p + 1))
            elif stage in ("joint", "cooldown"):
                b_high = cfg.bit_high
            if stage in ("projection", "joint"):
                for gq in quantizers.values():
                    gq.project(cfg.bit_low, b_high)
            trace.steps.append(
                {
                    "step": step,
                    "stage": stage,
                    "loss": loss.item(),
                    "b_high": b_high,
                    "bits": {n: gq.weight_bits() for n, gq in quantizers.items()},
                }
            )
            step += 1
    with torch.no_grad():  # anything still fading at the end is zeroed now
        for n, c in fading:
            original(model.get_submodule(n))[c].zero_()
            quantizers[n].group_mask[c] = 0.0
    if cfg.cooldown_steps == 0:
        for gq in quantizers.values():
            gq.pin(cfg.bit_low, cfg.bit_high)
    trace.pruned_groups = int(
        sum(int((gq.group_mask == 0).sum()) for gq in quantizers.values() if gq.prunable)
    )
    trace.final_bits = {n: int(gq.pinned_bits or 0) for n, gq in quantizers.items()}
    return trace


@register_handler(GetaConfig)
class GetaHandler(MethodHandler):
    """All quantizers attached at once (the last layer is not prunable), then GETA's
    own step-counted schedule instead of the training loop."""

    encodings: ClassVar[Encodings] = {"geta": (_decode_geta, _bound_geta)}

    def prepare(self, model: nn.Module, policy: Policy, quantized: list[str]) -> None:
        attach(model, quantized)

    def wrap(self, w: torch.Tensor, lp: LayerPolicy, policy: Policy, layer: str) -> None:
        return None  # attached by prepare

    def finetune(self, model: nn.Module, policy: Policy, schedule: Schedule) -> dict[str, Any]:
        cfg = policy.method
        assert isinstance(cfg, GetaConfig)
        quantizers = {
            name: pm
            for name, module in model.named_modules()
            if isinstance(pm := parametrization(module), GetaQuant)
        }
        trace = train(
            model,
            schedule.loader,
            quantizers,
            cfg,
            schedule.device,
            schedule.task,
            schedule.teacher,
        )
        return {"geta_trace": trace}
