"""Models and datasets as users hold them (issue 14, item 2): dataset items that are
dicts of tensors with ``labels`` or bare tensors, models that take keyword inputs and
return dicts, tuples or transformers-style ``ModelOutput``s. Used as entrypoints
(``tests.held:...``) by the unit and e2e tests."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


class DictDataset(Dataset):
    """Items ``{key: tensor}`` from columns of equal length."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class TensorOnly(Dataset):
    """Unlabelled items: the input tensor alone."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def digits_dicts() -> tuple[DictDataset, DictDataset]:
    """The digits as ``{pixel_values, labels}`` items."""
    from workers.zoo.data import digits

    out = []
    for ds in digits():
        x, y = ds.tensors
        out.append(DictDataset({"pixel_values": x, "labels": y}))
    return out[0], out[1]


def digits_unlabelled() -> tuple[TensorOnly, TensorOnly]:
    """The digits images alone (what distillation trains on)."""
    from workers.zoo.data import digits

    train, val = digits()
    return TensorOnly(train.tensors[0]), TensorOnly(val.tensors[0])


def token_dicts(n: int = 96, length: int = 12, vocab: int = 50) -> tuple[Any, Any]:
    """Random token sequences with padding: ``{input_ids, attention_mask}`` items, and
    a label (whether token 1 occurs among the unpadded ones) for classification."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[torch.rand(n, length, generator=g) < 0.15] = 1
    ids = ids * mask  # 0 is padding
    labels = ((ids == 1) & (mask == 1)).any(dim=1).long()
    cols = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    cut = n * 3 // 4
    return (
        DictDataset({k: v[:cut] for k, v in cols.items()}),
        DictDataset({k: v[cut:] for k, v in cols.items()}),
    )


class Output(OrderedDict):  # type: ignore[type-arg]
    """What transformers' ``ModelOutput`` is to a caller: an ordered mapping."""


class PixelNet(nn.Module):
    """Takes ``pixel_values=`` and returns ``{"logits": ...}``."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 10)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.conv(pixel_values))
        h = torch.relu(self.conv2(h)).mean(dim=(2, 3))
        return {"logits": self.head(h), "hidden": h}


class TupleNet(nn.Module):
    """Takes one tensor and returns ``(logits, features)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h


class TokenEncoder(nn.Module):
    """A small BERT-like encoder: ``input_ids``/``attention_mask`` in, an ``Output``
    with ``last_hidden_state`` ([B, T, D]) and ``logits`` (of the masked mean) out
    when ``classify``; ``last_hidden_state`` and ``pooler_output`` otherwise."""

    def __init__(self, vocab: int = 50, dim: int = 32, classify: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.norm = nn.LayerNorm(dim)
        self.classify = classify
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Output:
        h = self.emb(input_ids)
        h = self.norm(h + self.ff(h))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.classify:
            return Output(logits=self.head(pooled), last_hidden_state=h)
        return Output(last_hidden_state=h, pooler_output=torch.tanh(pooled))


def pixel_net(c: int = 16) -> nn.Module:
    return PixelNet(c)


def tuple_net() -> nn.Module:
    return TupleNet()


def token_encoder(classify: bool = True) -> nn.Module:
    return TokenEncoder(classify=classify)
