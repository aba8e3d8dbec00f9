"""Character-level language modelling on text that ships with Python.

The corpus is the standard library's ``pydoc_data.topics`` (the text of the
language reference's help topics), read in sorted key order; nothing is
downloaded. Characters map to a fixed 128-symbol ASCII vocabulary (anything else
becomes ``?``), so the model does not depend on the data. The text is cut into
windows of ``context + 1`` characters; a seeded shuffle splits them into train and
validation. The task is ``language_modeling`` and its objective perplexity:
``exp`` of the mean next-character cross-entropy over every position.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from workers.zoo.nets import EncoderBlock

VOCAB = 128
SPLIT_SEED = 0


def python_text(max_chars: int = 120_000) -> str:
    """The corpus: the first ``max_chars`` characters of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars]


def encode_text(text: str) -> np.ndarray:
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
    return np.minimum(codes, VOCAB - 1).astype(np.int64)


def python_text_dataset(
    context: int = 64, max_chars: int = 120_000, val_fraction: float = 0.1
) -> tuple[TensorDataset, TensorDataset]:
    """``(train, val)`` of ``(x, y)`` windows, ``y`` being ``x`` shifted by one char."""
    if context < 2:
        raise ValueError(f"context must be at least 2, but got {context}")
    codes = encode_text(python_text(max_chars))
    n = (len(codes) - 1) // context
    if n < 10:
        raise ValueError(f"max_chars={max_chars} leaves {n} windows of {context}; raise it")
    x = codes[: n * context].reshape(n, context)
    y = codes[1 : n * context + 1].reshape(n, context)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = max(1, round(val_fraction * n))
    va, tr = order[:n_val], order[n_val:]
    return (
        TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr])),
        TensorDataset(torch.from_numpy(x[va]), torch.from_numpy(y[va])),
    )


class CharLM(nn.Module):
    """A small causal transformer: token and position embeddings, pre-norm blocks,
    a final LayerNorm and a linear read-out to the vocabulary."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.tok(x) + self.pos(positions).unsqueeze(0)
        return self.head(self.norm(self.blocks(h)))


def char_lm(dim: int = 64, heads: int = 4, depth: int = 2, context: int = 64) -> nn.Module:
    return CharLM(dim=dim, heads=heads, depth=depth, context=context)
