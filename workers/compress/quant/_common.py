"""Shared pieces of the quantization methods: the weight-quantizer base class, the
straight-through round, and the bit-packed code blobs the checkpoint stores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces.methods import MethodConfig

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from search_spaces import LayerPolicy, Policy
    from workers.compress.train import Teacher

Decoder = Callable[[list[int], int, bytes], torch.Tensor]
Bound = Callable[[list[int], int, bytes], float]
Encodings = dict[str, tuple[Decoder, Bound]]  # encoding name -> (decoder, bound)
# encoding name -> decoder(shape, bits, blob) -> float tensor; filled from the handlers
DECODERS: dict[str, Decoder] = {}
# encoding name -> information bound in bits(shape, bits, blob); filled likewise
BOUNDS: dict[str, Bound] = {}


@dataclass(frozen=True)
class Schedule:
    """How a trial fine-tunes: its data, epochs, learning rate, device, the task whose
    loss it trains on, its seed and the per-epoch callback. Every handler's
    :meth:`MethodHandler.finetune` takes one; :meth:`train` is the plain loop."""

    loader: DataLoader
    epochs: int
    lr: float
    device: torch.device
    on_epoch: Callable[[int, float], None] | None = None
    seed: int = 0
    task: str = "classification"
    teacher: Teacher | None = None  # a distillation job's float model (its targets)
    lr_schedule: str = "cosine"  # ``workers.compress.train.LrSchedule``

    def train(self, model: nn.Module, epochs: int | None = None, *, report: bool = True) -> None:
        """The plain training loop on the task's loss: ``epochs`` (default: the
        schedule's), calling ``on_epoch`` when ``report``."""
        from workers.compress.train import train_epochs

        model.to(self.device)
        train_epochs(
            model,
            self.loader,
            epochs=self.epochs if epochs is None else epochs,
            lr=self.lr,
            device=self.device,
            on_epoch=self.on_epoch if report else None,
            task=self.task,
            teacher=self.teacher,
            schedule="warmup_linear" if self.lr_schedule == "warmup_linear" else "cosine",
        )


class MethodHandler:
    """The torch side of one method, registered for its config class
    (:func:`register_handler`): what ``workers.compress.quant.apply`` and ``finetune`` do for
    a policy whose ``method`` is that config, and the checkpoint encodings its
    quantizers write (their decoders and information bounds)."""

    # the encodings this method adds, registered into DECODERS / BOUNDS
    encodings: ClassVar[Encodings] = {}
    # encodings of the checkpoint's own (``q``, ``qs``, ...) it may also write
    also_writes: ClassVar[tuple[str, ...]] = ()

    def prepare(self, model: nn.Module, policy: Policy, quantized: list[str]) -> None:
        """Before any layer is wrapped (GETA attaches all its quantizers at once)."""

    def wrap(
        self, w: torch.Tensor, lp: LayerPolicy, policy: Policy, layer: str
    ) -> nn.Module | None:
        """The parametrization of one quantized layer's weight (``bits`` < 32), or
        ``None`` when :meth:`prepare` has wrapped it already."""
        raise NotImplementedError

    def finetune(self, model: nn.Module, policy: Policy, schedule: Schedule) -> dict[str, Any]:
        """Fine-tune the wrapped model; returns what the method learned (logged). The
        default: the plain training loop over the schedule's epochs."""
        schedule.train(model)
        return {}


HANDLERS: dict[type[MethodConfig], MethodHandler] = {}
H = TypeVar("H", bound=type[MethodHandler])


def register_handler(config: type[MethodConfig]) -> Callable[[H], H]:
    """Class decorator: the handler of ``config``'s method; its encodings become
    checkpoint encodings (a name two handlers claim is an error)."""

    def register(cls: H) -> H:
        if config in HANDLERS:
            raise TypeError(f"{config.__name__} has a handler already")
        for enc, (decode, bound) in cls.encodings.items():
            if enc in DECODERS:
                raise TypeError(f"encoding {enc!r} is registered twice")
            DECODERS[enc], BOUNDS[enc] = decode, bound
        HANDLERS[config] = cls()
        return cls

    return register


def handler_for(config: MethodConfig) -> MethodHandler:
    """The registered handler of a policy's method config."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"method {config.name!r} has no handler in workers/compress/quant/")
    return handler


def pattern_bound(decoded: torch.Tensor, bits: int) -> float:
    """Value bits of the nonzero weights plus the entropy of where they are (the side
    information, scales or exponents, is added by each method)."""
    from workers.codec.sparse_codec import log2_binomial

    n = decoded.numel()
    k = int((decoded != 0).sum())
    return float(bits * k) + log2_binomial(n, k)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def rows(w: torch.Tensor) -> torch.Tensor:
    """A weight as ``[out, fan_in]``: Linear/Embedding as is, Conv2d flattened per output."""
    return w.reshape(w.shape[0], -1)


class WeightQuantizer(nn.Module):
    """Base of the parametrizations in ``workers.compress.quant``: ``forward(weight)`` returns
    the fake-quantized weight (a fresh tensor; the parameter is never written)."""

    layer: str = ""

    def weight_bits(self) -> float:
        """Bits per weight used by the arithmetic (for BOPs)."""
        raise NotImplementedError

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        """``(encoding, bits, blob)`` of the exported weight; decodes to exactly the
        eval-mode ``forward(original)``."""
        raise NotImplementedError

    def encode_bound(self, shape: list[int], enc: str, bits: int, blob: bytes) -> float:
        """Information bound in bits of what :meth:`encode_weight` returned: value bits
        plus the pattern entropy and 16 bits per fp16 side value (``BOUNDS``)."""
        from workers.codec.sparse_codec import log2_binomial

        if enc in BOUNDS:
            return BOUNDS[enc](shape, bits, blob)
        if enc == "raw:float32":  # a float weight a method left as it is
            w = np.frombuffer(blob, dtype="<f4")
            k = int((w != 0).sum())
            return 32.0 * k + log2_binomial(w.size, k)
        return 8.0 * len(blob)


class FloatWeight(WeightQuantizer):
    """A layer any method leaves in float: its sparsity mask only (unstructured or N:M,
    from the float weight), exported as ``raw:float32``, ``fs`` or ``fsr``."""

    mask: torch.Tensor

    def __init__(
        self, weight: torch.Tensor, *, sparsity: float, kind: str = "unstructured", layer: str = ""
    ) -> None:
        from workers.compress.sparsity import kind_mask

        super().__init__()
        self.layer = layer
        mask = kind_mask(weight.detach(), sparsity, kind, layer)
        self.register_buffer("mask", mask.to(torch.float32))
        self.dense = bool(mask.all())  # no pruning: skip the multiply

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.dense else weight * self.mask

    def weight_bits(self) -> float:
        return 32.0

    def encode_weight(self, original: torch.Tensor) -> tuple[str, int, bytes]:
        from workers.codec.tensors import encode_float

        enc, blob = encode_float((original.detach().float() * self.mask).cpu())
        return enc, 32, blob

    def encode_bound(self, shape: list[int], enc: str, bits: int, blob: bytes) -> float:
        from workers.codec.tensors import float_bound

        return float_bound(shape, enc, blob)


def parametrization(module: nn.Module) -> nn.Module | None:
    """The first weight parametrization of ``module``, if it has one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist: Any = getattr(module, "parametrizations").weight  # noqa: B009 (typed as Any)
    first = plist[0]
    return first if isinstance(first, nn.Module) else None


def original(module: nn.Module) -> torch.Tensor:
    """The stored float weight of a parametrized (or plain) layer."""
    if parametrize.is_parametrized(module, "weight"):
        plist: Any = getattr(module, "parametrizations").weight  # noqa: B009
        t = plist.original
    else:
        t = module.weight
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return t


def weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight tensor (checked, for the type checker and bad models)."""
    w = module.weight
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w
