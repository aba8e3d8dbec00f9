"""Training and evaluation loops shared by the baseline, the trials and `evaluate`,
and the torch part of each task (``service/tasks.py`` has the pure part): its loss
(:data:`TASK_LOSSES`) and the metrics its trials report (:meth:`EvalResult.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from service.tasks import get_task, task_names

Loss = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]  # (logits, y, reduction)


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
    accuracy: float  # fraction of correct top-1 predictions (per token for LMs), in [0, 1]
    loss: float  # mean cross-entropy (NLL, nats)

    @property
    def perplexity(self) -> float:
        """``exp`` of the mean cross-entropy: the language-modelling objective."""
        import math

        return math.exp(min(self.loss, 700.0))

    def metrics(self, task: str) -> dict[str, float]:
        """What a trial of ``task`` reports of this evaluation (the task's ``reports``)."""
        return {name: float(getattr(self, name)) for name in get_task(task).reports}


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


TASK_LOSSES: dict[str, Loss] = {
    "classification": _class_loss,
    "language_modeling": _next_token_loss,
}
_missing = set(task_names()) - set(TASK_LOSSES)
if _missing:  # a task registered without its torch part: fail at import, not mid-search
    raise ImportError(f"tasks without a loss in workers/compress/train.py: {sorted(_missing)}")


def task_loss(task: str) -> Loss:
    """The training and evaluation loss of ``task``."""
    get_task(task)  # an unknown name: the registry's error
    return TASK_LOSSES[task]


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
    task: str = "classification",
) -> list[float]:
    """Adam with cosine decay on the task's loss; returns the mean training loss of
    each epoch."""
    criterion = task_loss(task)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(loader)))
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = criterion(model(x), y, "mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            count += len(y)
        losses.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, task: str = "classification"
) -> EvalResult:
    """Top-1 accuracy (per token for a language model) and the task's mean loss."""
    criterion = task_loss(task)
    model.to(device).eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += float(criterion(out, y, "sum"))
        logits, y = _flat(out, y)
        correct += int((logits.argmax(dim=1) == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("the validation set is empty")
    return EvalResult(accuracy=correct / total, loss=loss / total)
