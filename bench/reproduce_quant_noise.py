"""Reproduce Quant-Noise's claims at small scale (Fan, Stock et al., ICLR 2021):
post-training quantization vs full-STE QAT (p = 1) vs Quant-Noise (p in {0.1, 0.25,
0.5}) at int8/int4/int3/int2, and iPQ after plain, QAT-PQ (exact PQ noise, p = 1)
and Quant-Noise (PQ proxy, p = 0.1) fine-tuning.

Data and model ship with the dependencies: scikit-learn's digits and the builtin
digits CNN (narrow, so that compression hurts). Per seed: train the float model,
then every row starts from that same float model, fine-tunes (or not) with its
method, is exported to ``.sparq`` bytes, decoded, and the decoded model is
evaluated (accuracy and NLL on the validation split, ~360 images). Mean and
standard deviation over seeds.

Usage (from the repository root)::

    .venv/bin/python bench/reproduce_quant_noise.py            # 3 seeds, a few minutes
    .venv/bin/python bench/reproduce_quant_noise.py --record   # also rewrite its
                                                               # section of docs/reproduction.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from bench._doc import machine, record_section  # noqa: E402
from search_spaces import LayerPolicy, Policy  # noqa: E402
from service.spec import ModelSpec  # noqa: E402
from workers.compress import quant  # noqa: E402
from workers.compress.engine import compressible_layers  # noqa: E402
from workers.compress.quant import ipq  # noqa: E402
from workers.compress.train import evaluate, make_loader, train_epochs  # noqa: E402
from workers.jobs import checkpoint as ckpt  # noqa: E402
from workers.zoo.data import digits  # noqa: E402
from workers.zoo.models import digits_cnn  # noqa: E402

DOC = ROOT / "docs" / "reproduction.md"
SECTION = (
    "## Quant-Noise: PTQ vs full-STE QAT vs Quant-Noise, and iPQ (bench/reproduce_quant_noise.py)"
)
CPU = torch.device("cpu")


def policy(model: nn.Module, bits: int, **kw: Any) -> Policy:
    layers = {i.name: LayerPolicy(bits=bits, sparsity=0.0) for i in compressible_layers(model)}
    return Policy(layers=layers, **kw)


def measure(model: nn.Module, spec: ModelSpec, val: Any) -> dict[str, float]:
    """Export, decode, evaluate the decoded model."""
    data = ckpt.encode(model.cpu(), model_spec=spec)
    r = evaluate(ckpt.decode(data).model, make_loader(val, 512, shuffle=False), CPU)
    return {"acc": 100 * r.accuracy, "nll": r.loss, "kb": len(data) / 1024}


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Any, batches: int = 10) -> nn.Module:
    """Recompute BatchNorm running statistics with the fully quantized weights (every
    weight parametrization in eval mode, BN in train mode with a cumulative average)."""
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x)
    model.eval()
    return model


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    train, val = digits()
    spec = ModelSpec(builtin="digits-cnn", kwargs={"width": args.width})
    torch.manual_seed(seed)
    base = digits_cnn(width=args.width)
    loader = make_loader(train, 64, shuffle=True, seed=seed)
    train_epochs(base, loader, epochs=args.baseline_epochs, lr=3e-3, device=CPU)
    out: dict[str, dict[str, float]] = {"float": measure(base, spec, val)}
    ft = {"epochs": args.finetune_epochs, "lr": args.lr, "device": CPU}
    for bits in (8, 4, 3, 2):
        rows: dict[str, float | None] = {"PTQ": None, "QAT p=1": 1.0}
        rows |= {f"QN p={p}": p for p in (0.1, 0.25, 0.5)}
        for label, p in rows.items():
            torch.manual_seed(seed)
            m = copy.deepcopy(base)
            pol = policy(m, bits, noise_rate=1.0 if p is None else p, noise_block=args.block)
            quant.apply(m, pol)
            if p is not None:
                quant.finetune(m, pol, loader, **ft)
            out[f"int{bits} {label}"] = measure(m, spec, val)
            if args.bn_reestimate and bits < 8:
                out[f"int{bits} {label} + BN re-est."] = measure(
                    reestimate_bn(m, loader), spec, val
                )
    # iPQ: the same staged iPQ (k-means per stage, centroid fine-tuning between stages)
    # after three different fine-tunes of the float model.
    names = [i.name for i in compressible_layers(base)]
    for label, kind in (
        ("iPQ, no fine-tune (k-means only)", "ptq"),
        ("iPQ after plain fine-tune", "plain"),
        ("iPQ after QAT-PQ (exact PQ noise, p=1)", "qat"),
        ("iPQ after Quant-Noise (PQ proxy, p=0.1)", "qn"),
    ):
        torch.manual_seed(seed)
        m = copy.deepcopy(base)
        if kind == "ptq":
            ipq.quantize_layers(m, names, k=args.centroids, block=args.block, seed=seed)
            out[label] = measure(m, spec, val)
            continue
        for n in names:
            mod = m.get_submodule(n)
            weight = mod.weight
            if not isinstance(weight, torch.Tensor):
                raise TypeError(n)
            if kind == "qat":
                pm: nn.Module = ipq.PQExactNoise(
                    weight, k=args.centroids, block=args.block, p=1.0, layer=n, seed=seed
                )
            elif kind == "qn":
                pm = quant.quant_noise.PQNoise(weight, p=0.1, block=args.block, layer=n)
            else:
                continue
            parametrize.register_parametrization(mod, "weight", pm)
        train_epochs(m, loader, epochs=args.finetune_epochs, lr=args.lr, device=CPU)

        def tune(model: nn.Module) -> None:
            train_epochs(model, loader, epochs=args.stage_epochs, lr=args.lr, device=CPU)

        ipq.staged(m, names, k=args.centroids, block=args.block, finetune=tune, seed=seed)
        out[label] = measure(m, spec, val)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--baseline-epochs", type=int, default=15)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--stage-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--centroids", type=int, default=16)
    p.add_argument(
        "--bn-reestimate",
        action="store_true",
        help="also report int4/3/2 rows after re-estimating BatchNorm statistics with the "
        "fully quantized weights (tests the train/eval mismatch explanation)",
    )
    p.add_argument("--record", action="store_true", help=f"rewrite its section of {DOC}")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    per_row: dict[str, list[dict[str, float]]] = defaultdict(list)
    for seed in range(args.seeds):
        for row, r in run_seed(seed, args).items():
            per_row[row].append(r)
        print(f"seed {seed} done after {time.perf_counter() - started:.0f} s", flush=True)
    lines = [
        f"digits CNN (width {args.width}), {args.seeds} seeds; float baseline "
        f"{args.baseline_epochs} epochs; fine-tune {args.finetune_epochs} epochs (lr {args.lr}); "
        f"noise block {args.block}; iPQ K={args.centroids}, block {args.block} "
        f"(3x3 convs: one kernel), {args.stage_epochs} epoch(s) of centroid fine-tuning "
        "per stage. Every figure is measured on the decoded .sparq checkpoint.",
        "",
        "| row | accuracy % (mean ± std) | NLL (mean ± std) | size KiB |",
        "|---|---:|---:|---:|",
    ]
    figures: dict[str, Any] = {}
    for row, rs in per_row.items():
        acc = [r["acc"] for r in rs]
        nll = [r["nll"] for r in rs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(
            f"| {row} | {statistics.mean(acc):.2f} ± {sd(acc):.2f} | "
            f"{statistics.mean(nll):.3f} ± {sd(nll):.3f} | {rs[0]['kb']:.2f} |"
        )
        figures[row] = {
            "acc": round(statistics.mean(acc), 2),
            "acc_std": round(sd(acc), 2),
            "nll": round(statistics.mean(nll), 4),
        }
    elapsed = time.perf_counter() - started
    text = "\n".join(lines)
    print(text)
    print(f"\nwall time {elapsed:.0f} s")
    if args.record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = f".venv/bin/python bench/reproduce_quant_noise.py {' '.join(sys.argv[1:])}".rstrip()
        body = "\n".join(
            [
                SECTION,
                "",
                f"- Date: {stamp}; wall time {elapsed:.0f} s",
                f"- Machine: {machine()}",
                f"- Command: `{cmd}`",
                "",
                text,
                "",
                "```json",
                json.dumps(figures),
                "```",
                "",
            ]
        )
        record_section(DOC, SECTION, body, title="# Reproduction")
        print(f"recorded in {DOC}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
