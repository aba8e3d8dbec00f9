"""Builtin networks beyond the MLP/CNN: a depthwise-separable CNN with a
squeeze-and-excitation gate, and a small transformer encoder (embeddings, LayerNorm,
multi-head attention). Both read the 1x8x8 digits images; the encoder block is shared
with the character-level language model in :mod:`workers.zoo.lm`."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Channel gate (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 then pointwise 1x1 (Howard et al., MobileNets, 2017)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.se = SqueezeExcite(cin) if se else nn.Identity()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(torch.relu(self.bn1(self.dw(x))))
        return torch.relu(self.bn2(self.pw(y)))


def digits_dsconv(width: int = 16, num_classes: int = 10) -> nn.Module:
    """Depthwise-separable CNN with one SE gate, for 1x8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        DepthwiseSeparable(width, 2 * width, se=True),
        DepthwiseSeparable(2 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: LayerNorm → MHA → add; LayerNorm → MLP → add."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        mask = None
        if self.causal:
            t = x.shape[1]
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + a
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """Each of the 8 image rows is a token: linear patch embedding plus a learned
    position embedding, encoder blocks, a final LayerNorm, mean pooling, a classifier."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Embedding(8, dim)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], 8, 8)
        positions = torch.arange(tokens.shape[1], device=x.device)
        h = self.embed(tokens) + self.pos(positions).unsqueeze(0)
        return self.head(self.norm(self.blocks(h)).mean(dim=1))


def digits_transformer(
    dim: int = 32, heads: int = 4, depth: int = 2, num_classes: int = 10
) -> nn.Module:
    return DigitsTransformer(dim=dim, heads=heads, depth=depth, num_classes=num_classes)
