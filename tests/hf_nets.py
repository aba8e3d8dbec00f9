"""Architectures from ``transformers`` as a user holds them (issue 14, item 5): each
function returns the library's own model class built from a small random config,
with no wrapper (dict inputs, ``ModelOutput`` outputs, GPT-2's ``Conv1D`` layers,
ViT's bare class token and position embeddings, ResNet's batch norms). Nothing is
downloaded: configs are written here and ``HF_HUB_OFFLINE`` is set before
transformers is imported. Used as entrypoints (``tests.hf_nets:...``) by
tests/e2e/test_transformers.py and the unit tests.

The data is real: the 8x8 digits, as images (``pixel_values``) for the vision models
and as a sequence of 64 pixel-intensity tokens (0-16) after a ``[CLS]`` token for the
BERT classifier; the GPT-2 LM reads the builtin ``python-text`` characters.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CLS = 17  # pixel intensities are 0..16; the [CLS] token follows them
DIGIT_TOKENS = 18


class Columns(Dataset):
    """Items ``{key: tensor}`` from columns of equal length."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def digits_pixels() -> tuple[Columns, Columns]:
    """The digits as ``{pixel_values: 1x8x8 float, labels}`` items (what a
    transformers image classifier takes)."""
    from workers.zoo.data import digits

    out = []
    for ds in digits():
        x, y = ds.tensors
        out.append(Columns({"pixel_values": x, "labels": y}))
    return out[0], out[1]


def digits_tokens() -> tuple[Columns, Columns]:
    """The digits as token sequences ``{input_ids, attention_mask, labels}``: ``[CLS]``
    then the 64 pixel intensities (0-16) in raster order."""
    from workers.zoo.data import digits

    out = []
    for ds in digits():
        x, y = ds.tensors
        ids = torch.round(x.flatten(1) * 16).long()
        ids = torch.cat([torch.full((len(ids), 1), CLS), ids], dim=1)
        out.append(Columns({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": y}))
    return out[0], out[1]


def _tiny(**over: Any) -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **over,
    }


def bert_classifier(num_labels: int = 10) -> nn.Module:
    """``BertForSequenceClassification`` (2 layers, width 32) over the digit tokens."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        **_tiny(vocab_size=DIGIT_TOKENS, max_position_embeddings=72, num_labels=num_labels),
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def gpt2_lm(dim: int = 32, layers: int = 2, context: int = 64) -> nn.Module:
    """``GPT2LMHeadModel`` over the 128-symbol character vocabulary of ``python-text``
    (its attention and MLP are transformers' ``Conv1D``, its head tied to ``wte``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from workers.zoo.lm import VOCAB

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=context,
        n_embd=dim,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def vit_classifier() -> nn.Module:
    """``ViTForImageClassification`` on 8x8 one-channel images, 2x2 patches."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        **_tiny(image_size=8, patch_size=2, num_channels=1, num_labels=10),
        attn_implementation="eager",
    )
    return ViTForImageClassification(config)


def resnet_classifier() -> nn.Module:
    """``ResNetForImageClassification`` (basic blocks, two stages of width 16 and 32)
    on 8x8 one-channel images."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )
    return ResNetForImageClassification(config)
