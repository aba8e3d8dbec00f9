"""Networks built for the tests, loaded by entrypoint (``tests.nets:NAME``) exactly as a
user's model would be: sparq has no code for any of them. All read 1x8x8 digits.

Each is the generality case the issue names: a residual CNN, channel concatenation,
squeeze-and-excitation gates, depthwise-separable convolutions, and a small
transformer encoder with embeddings, LayerNorm and multi-head attention.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))


class ResidualCNN(nn.Module):
    def __init__(self, c: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.block1 = _ResBlock(c)
        self.block2 = _ResBlock(c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.down(x)).mean(dim=(2, 3)))


class ConcatCNN(nn.Module):
    """Two branches concatenated along channels (an Inception/DenseNet-style join)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.left = nn.Conv2d(c, c, 1)
        self.right = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.bn = nn.BatchNorm2d(4 * c)
        self.mix = nn.Conv2d(4 * c, 2 * c, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        y = torch.cat([s, self.left(s), self.right(s)], dim=1)  # the stem is reused too
        y = torch.relu(self.mix(torch.relu(self.bn(y))))
        return self.fc(y.mean(dim=(2, 3)))


class _SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.squeeze = nn.Linear(c, c // 4)
        self.excite = nn.Linear(c // 4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean(dim=(2, 3))))))
        return x * g[:, :, None, None]


class SECNN(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.se1 = _SE(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.se2 = _SE(2 * c)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se1(torch.relu(self.conv1(x)))
        x = self.se2(torch.relu(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class DSConvNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.dw1 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pw1 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.dw2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1, groups=2 * c, bias=False)
        self.pw2 = nn.Conv2d(2 * c, 2 * c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.pw1(self.dw1(x))))
        x = torch.relu(self.bn2(self.pw2(self.dw2(x))))
        return self.fc(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Pixels quantized to 17 levels are tokens (an ``nn.Embedding``), plus a position
    embedding; one pre-norm encoder layer with multi-head attention; mean pooling."""

    def __init__(self, dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(17, dim)
        self.pos = nn.Embedding(64, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 2 * dim)
        self.ff2 = nn.Linear(2 * dim, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.reshape(x.shape[0], 64) * 16).round().long().clamp(0, 16)
        h = self.tok(ids) + self.pos(torch.arange(64, device=x.device)).unsqueeze(0)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ff2(torch.relu(self.ff1(self.ln2(h))))
        return self.head(self.ln_f(h).mean(dim=1))


def residual_cnn(c: int = 12) -> nn.Module:
    return ResidualCNN(c)


def concat_cnn(c: int = 8) -> nn.Module:
    return ConcatCNN(c)


def se_cnn(c: int = 16) -> nn.Module:
    return SECNN(c)


def dsconv_net(c: int = 16) -> nn.Module:
    return DSConvNet(c)


def tiny_transformer(dim: int = 24, heads: int = 4) -> nn.Module:
    return TinyTransformer(dim, heads)


class TinyViT(nn.Module):
    """A ViT as such models are written: 2x2 patches of the 8x8 digit, a class token and
    position embeddings that are bare ``nn.Parameter``s, one encoder layer, the class
    token's output classified. Nobody wrote sparq's engine for it."""

    def __init__(self, dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 2 * dim, batch_first=True)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = x.reshape(b, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 4)
        h = torch.cat([self.cls.expand(b, -1, -1), self.patch(patches)], dim=1) + self.pos
        return self.head(self.encoder(h)[:, 0])


class SEResNet(nn.Module):
    """A residual block with squeeze-excitation to 6 channels (24 // 4): widths that no
    default block size (4) divides."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.squeeze = nn.Conv2d(c, c // 4, 1)
        self.excite = nn.Conv2d(c // 4, c, 1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(s)))))
        g = torch.sigmoid(self.excite(torch.relu(self.squeeze(y.mean(dim=(2, 3), keepdim=True)))))
        return self.fc(torch.relu(s + y * g).mean(dim=(2, 3)))


def tiny_vit(dim: int = 24, heads: int = 4) -> nn.Module:
    return TinyViT(dim, heads)


def se_resnet(c: int = 24) -> nn.Module:
    return SEResNet(c)


class _BreaksWhenCompressed(nn.Module):
    """An MLP that trains and evaluates as a float model but raises once a weight is
    wrapped by a compression method: every trial of it fails, with this message."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if parametrize.is_parametrized(self.fc1):
            raise RuntimeError("this test network refuses compressed weights")
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def breaks_when_compressed() -> nn.Module:
    return _BreaksWhenCompressed()


UNSEEN = ["tiny_vit", "se_resnet"]  # the networks of the "Real models" issue


GENERALITY = ["residual_cnn", "concat_cnn", "se_cnn", "dsconv_net", "tiny_transformer"]


class _Untrainable(nn.Module):
    """An MLP that runs in eval mode (so it can be traced, described and exported) but
    raises in training mode: its float baseline cannot be trained."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("this model refuses to train")
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def untrainable() -> nn.Module:
    return _Untrainable()


def environ_digits(dump: str) -> tuple[object, object]:
    """A dataset entrypoint that does what hostile user code would: appends the
    environment of the process it runs in (``/proc/self/environ`` and ``os.environ``)
    to ``dump``, and in a Ray worker (the
    baseline's) fails with that environment as its error, which the job then shows.
    In the driver it returns digits, so the search goes on to the worker."""
    import os
    from pathlib import Path

    from workers.zoo.data import digits

    environ = Path("/proc/self/environ").read_text()
    with open(dump, "a") as f:
        f.write(environ.replace("\0", "\n") + "\n")
        # and os.environ: in a driver forked warm (service/warm.py) the process title
        # Ray's setproctitle writes overwrites part of /proc/self/environ, so the
        # environment user code can read is os.environ as much as that file
        f.write("".join(f"{k}={v}\n" for k, v in os.environ.items()))
    if "SPARQ_DATABASE_URL" not in os.environ:  # a Ray worker: only the driver has it
        raise ValueError(f"could not parse {environ!r}")
    return digits()
