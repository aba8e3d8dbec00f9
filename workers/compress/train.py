"""Training and evaluation loops shared by the baseline, the trials and `evaluate`,
and the torch part of each task (``service/tasks.py`` has the pure part): its loss
(:data:`TASK_LOSSES`) and the metrics its trials report (:meth:`EvalResult.metrics`).

Every loop reads its batches through :mod:`workers.compress.batch` (tensors, tuples or
dicts in; tensors, tuples, dicts or ``ModelOutput`` out). A ``distillation`` job's
loops also take a :class:`Teacher`: the float model whose outputs are the targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from service.tasks import get_task, task_names
from workers.compress import batch as B

Loss = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]  # (logits, y, reduction)
LrSchedule = Literal["cosine", "warmup_linear"]
WARMUP_FRACTION = 0.1  # of the steps, for ``warmup_linear``


def pick_device(gpus: float) -> torch.device:
    """A worker given a GPU by Ray trains on it (Ray sets CUDA_VISIBLE_DEVICES)."""
    if gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(f"resources.gpus={gpus} but CUDA is not available on this worker")
        return torch.device("cuda")
    return torch.device("cpu")


def set_threads(cpus: float) -> None:
    """Torch's intra-op threads match the CPUs Ray gave the worker."""
    torch.set_num_threads(max(1, int(cpus)))


@dataclass(frozen=True)
class EvalResult:
    # fraction of correct top-1 predictions (per token for LMs), in [0, 1]; for
    # distillation the similarity to the teacher (cosine, or top-1 agreement for logits)
    accuracy: float
    loss: float  # mean cross-entropy (NLL, nats); distillation: the distillation loss
    cosine: float = math.nan  # distillation: mean cosine similarity to the teacher

    @property
    def perplexity(self) -> float:
        """``exp`` of the mean cross-entropy: the language-modelling objective."""
        return math.exp(min(self.loss, 700.0))

    def metrics(self, task: str) -> dict[str, float]:
        """What a trial of ``task`` reports of this evaluation (the task's ``reports``)."""
        return {name: float(getattr(self, name)) for name in get_task(task).reports}


@dataclass
class Teacher:
    """A distillation job's float model (its outputs are the targets) and how the
    student is compared with it: ``loss`` ``cosine``/``mse`` on (mean-pooled)
    embeddings, ``kl`` on logits, ``auto`` = ``kl`` for an output named ``logits``,
    else ``cosine``."""

    model: nn.Module
    loss: str = "auto"

    def targets(self, inputs: B.Inputs) -> tuple[str, torch.Tensor]:
        self.model.eval()
        with torch.no_grad():
            return B.output_of(B.call(self.model, inputs))

    def kind(self, output_name: str) -> str:
        if self.loss != "auto":
            return self.loss
        return "kl" if output_name == "logits" else "cosine"


def _flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs ``[B, T, C]`` (language modelling) become ``[B*T, C]``."""
    if logits.dim() == 3:
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return logits, y


def _class_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy per sample (a model with sequence outputs: per position, as
    before tasks had a loss of their own)."""
    return nn.functional.cross_entropy(*_flat(logits, y), reduction=reduction)


def _next_token_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """Next-token cross-entropy over every position of ``[B, T, V]`` logits, so the
    mean is the per-token NLL whose exp is the perplexity."""
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction
    )


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_row.sum() if reduction == "sum" else per_row.mean()


def _cosine_loss(s: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
    """1 - cosine similarity of each row of the student's and the teacher's vectors."""
    return _reduce(1 - nn.functional.cosine_similarity(s, t, dim=-1), reduction)


def _mse_loss(s: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
    return _reduce(((s - t) ** 2).mean(dim=-1), reduction)


def _kl_loss(s: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes of each row of logits."""
    per = nn.functional.kl_div(
        s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    return _reduce(per, reduction)


DISTILL_LOSSES: dict[str, Loss] = {"cosine": _cosine_loss, "mse": _mse_loss, "kl": _kl_loss}

TASK_LOSSES: dict[str, Loss] = {
    "classification": _class_loss,
    "language_modeling": _next_token_loss,
    "distillation": _cosine_loss,  # on pooled outputs; the Teacher picks among DISTILL_LOSSES
}
_missing = set(task_names()) - set(TASK_LOSSES)
if _missing:  # a task registered without its torch part: fail at import, not mid-search
    raise ImportError(f"tasks without a loss in workers/compress/train.py: {sorted(_missing)}")


def task_loss(task: str) -> Loss:
    """The training and evaluation loss of ``task``."""
    get_task(task)  # an unknown name: the registry's error
    return TASK_LOSSES[task]


def rows(out: torch.Tensor, kind: str, mask: torch.Tensor | None) -> torch.Tensor:
    """A distillation output as one vector per compared item: logits per position
    (``[B*T, V]``), token embeddings ``[B, T, D]`` mean-pooled over the attention mask,
    anything else flattened per sample."""
    if kind == "kl":
        return out.reshape(-1, out.shape[-1])
    if out.dim() == 3:
        if mask is None:
            return out.mean(dim=1)
        m = mask.to(out.dtype).unsqueeze(-1)
        return (out * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
    return out.reshape(out.shape[0], -1)


def _pair(
    model: nn.Module, b: B.Batch, teacher: Teacher | None, task: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The model's output and its target for one batch: the labels, or for
    distillation the teacher's output, both as :func:`rows`; and the loss kind."""
    name, out = B.output_of(B.call(model, b.inputs))
    if get_task(task).needs_teacher:
        if teacher is None:
            raise ValueError(f"task {task!r} needs the teacher (the float model)")
        _, target = teacher.targets(b.inputs)
        kind = teacher.kind(name)
        return rows(out, kind, b.attention_mask), rows(target, kind, b.attention_mask), kind
    if b.labels is None:
        raise ValueError(
            f"task {task!r} needs labels: dataset items must be (inputs, labels) or a "
            "mapping with `labels`"
        )
    return out, b.labels, task


def _criterion(task: str, kind: str) -> Loss:
    return DISTILL_LOSSES[kind] if get_task(task).needs_teacher else task_loss(task)


def batch_loss(
    model: nn.Module,
    item: object,
    device: torch.device,
    task: str,
    teacher: Teacher | None = None,
) -> tuple[torch.Tensor, int]:
    """The task's mean loss of ``model`` on one loader batch (as users hold it), and
    the number of samples in it: every training loop's step."""
    b = B.split(item).to(device)
    out, target, kind = _pair(model, b, teacher, task)
    return _criterion(task, kind)(out, target, "mean"), b.size


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


def _optimizer(
    model: nn.Module, lr: float, steps: int, schedule: LrSchedule
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with cosine decay (networks trained here), or AdamW with a linear warm-up
    over the first tenth of the steps and linear decay (a pretrained model: its
    weights are kept intact by small, gentle steps)."""
    if schedule == "warmup_linear":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        warm = max(1, round(WARMUP_FRACTION * steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (steps - step) / max(1, steps - warm))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
    task: str = "classification",
    teacher: Teacher | None = None,
    schedule: LrSchedule = "cosine",
) -> list[float]:
    """The task's loss minimized with ``schedule`` (:func:`_optimizer`); returns the
    mean training loss of each epoch. ``teacher``: a distillation job's float model."""
    model.to(device).train()
    if teacher is not None:
        teacher.model.to(device)
    opt, sched = _optimizer(model, lr, epochs * len(loader), schedule)
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for item in loader:
            loss, n = batch_loss(model, item, device, task, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * n
            count += n
        losses.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    task: str = "classification",
    teacher: Teacher | None = None,
) -> EvalResult:
    """Top-1 accuracy (per token for a language model) and the task's mean loss; for
    distillation, the similarity to ``teacher`` on these inputs (mean cosine of the
    compared rows, and top-1 agreement for logits, which is then the ``accuracy``)."""
    model.to(device).eval()
    if teacher is not None:
        teacher.model.to(device)
    correct, total, loss, cos = 0, 0, 0.0, 0.0
    kind = ""
    for item in loader:
        b = B.split(item).to(device)
        out, y, kind = _pair(model, b, teacher, task)
        loss += float(_criterion(task, kind)(out, y, "sum"))
        if get_task(task).needs_teacher:
            cos += float(nn.functional.cosine_similarity(out, y, dim=-1).sum())
            correct += int((out.argmax(dim=-1) == y.argmax(dim=-1)).sum())
            total += out.shape[0]
            continue
        logits, y = _flat(out, y)
        correct += int((logits.argmax(dim=1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("the validation set is empty")
    if get_task(task).needs_teacher:
        agreement = kind == "kl"
        return EvalResult(
            accuracy=(correct if agreement else cos) / total, loss=loss / total, cosine=cos / total
        )
    return EvalResult(accuracy=correct / total, loss=loss / total)
