"""The generality note: per network, the prunable channel groups and the layers left
dense, with the reason; and what removing half of every group's channels does to the
parameter count (the reloaded module is smaller, not only zero).

    .venv/bin/python bench/pruning_note.py            # prints Markdown, then one JSON line

Runs on the test networks (``tests/nets.py``, loaded by entrypoint like a user's
model) and the builtin models. Nothing is trained: the graph and the groups depend
on the architecture only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.spec import ModelSpec
from workers.compress.pruning import analyze, count_params, prune_channels
from workers.zoo.models import build_model

NETWORKS = [
    "tests.nets:residual_cnn",
    "tests.nets:concat_cnn",
    "tests.nets:se_cnn",
    "tests.nets:dsconv_net",
    "tests.nets:tiny_transformer",
    "digits-mlp",
    "digits-cnn",
    "digits-dsconv",
    "digits-transformer",
    "char-lm",
]


def main() -> None:
    figures = {}
    print(
        "| network | prunable groups | layers in groups | left dense (why) "
        "| params dense → half pruned |"
    )
    print("|---|---|---|---|---|")
    for label in NETWORKS:
        spec = ModelSpec(entrypoint=label) if ":" in label else ModelSpec(builtin=label)
        torch.manual_seed(0)
        model = build_model(spec)
        x = torch.zeros(1, 64, dtype=torch.long) if label == "char-lm" else torch.rand(1, 1, 8, 8)
        report = analyze(model, x)
        before = count_params(model)
        prune_channels(model, {g.name: 0.5 for g in report.groups}, x, report=report)
        after = count_params(model)
        groups = ", ".join(
            f"`{g.name}` ({g.channels} ch{f', {g.heads} heads' if g.heads > 1 else ''})"
            for g in report.groups
        )
        members = sum(len(g.layers) for g in report.groups)
        dense = "; ".join(f"`{k}`: {v}" for k, v in report.dense.items()) or "none"
        row = [f"`{label}`", f"{len(report.groups)}: {groups}", str(members), dense]
        print("| " + " | ".join([*row, f"{before} → {after}"]) + " |")
        figures[label] = {
            "groups": len(report.groups),
            "dense": sorted(report.dense),
            "params": before,
            "params_half_pruned": after,
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
