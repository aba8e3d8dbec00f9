"""Sparsity x quantization order (Harma et al., ICLR 2025): is sparsity-then-
quantization (S->Q) better than quantization-then-sparsity (Q->S), and is their
combined damage more than the sum of each alone?

Two parts, both on data that ships with the dependencies:

1. A matrix check: heavy-tailed (Student-t, 3 dof) 256x512 weights, relative L2
   error of S->Q and Q->S against the float matrix, several seeds.
2. The digits CNN: train the float model (per seed); from it, S-only (sparse
   fine-tune), Q-only (full-STE QAT fine-tune), S->Q and Q->S (the mask taken from
   the float or from the quantized weights, then fixed, then the same quantized
   fine-tune), all with the same ``--finetune-epochs`` (0 = one-shot), exported to
   ``.sparq`` and the decoded model evaluated; Delta NLL against float, and the
   non-orthogonality check Delta(S->Q) vs Delta(S) + Delta(Q).

Formats: INT4 and INT3 (per-channel symmetric), MX-like with int4 and FP4 (E2M1)
elements (blocks of 32, power-of-two scale), block floating point with 4-bit
mantissas (blocks of 64). Sparsity: 50% unstructured (exact top-k per layer) and
2:4 along the reduction dimension (layers whose fan-in is not a multiple of 4, here
the first 3x3 conv with fan-in 9, stay dense under 2:4). Masks come from the float
weights (S->Q) or from the quantized weights (Q->S, where ties between equal codes
are broken by index, which is what makes Q->S drop weights that were larger in full
precision).

Usage::

    .venv/bin/python bench/reproduce_order.py [--seeds 3] [--record]
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

from bench._doc import machine, record_section  # noqa: E402
from search_spaces import LayerPolicy, Policy  # noqa: E402
from service.spec import ModelSpec  # noqa: E402
from workers.compress import quant  # noqa: E402
from workers.compress.engine import compressible_layers  # noqa: E402
from workers.compress.quant._common import parametrization  # noqa: E402
from workers.compress.quant.blockfmt import block_quant  # noqa: E402
from workers.compress.quant.quant_noise import fake_int  # noqa: E402
from workers.compress.sparsity import magnitude_mask  # noqa: E402
from workers.compress.train import evaluate, make_loader, train_epochs  # noqa: E402
from workers.jobs import checkpoint as ckpt  # noqa: E402
from workers.zoo.data import digits  # noqa: E402
from workers.zoo.models import digits_cnn  # noqa: E402

DOC = ROOT / "docs" / "reproduction.md"
SECTION = "## Sparsity x quantization order (bench/reproduce_order.py)"
CPU = torch.device("cpu")
# label -> (policy method, bits, extra policy fields)
FORMATS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "INT8": ("quant_noise", 8, {}),
    "INT4": ("quant_noise", 4, {}),
    "INT3": ("quant_noise", 3, {}),
    "MX int4 (block 32)": ("mx", 4, {}),
    "MX FP4 E2M1 (block 32)": ("mx", 4, {"mx_element": "fp"}),
    "BFP4 (block 64)": ("bfp", 4, {}),
}
SPARSITY = ("50%", "2:4")


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor | None:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the flattened
    fan-in (exact: ties broken by index); ``None`` when the fan-in does not divide."""
    r = w.detach().reshape(w.shape[0], -1)
    if r.shape[1] % m:
        return None
    g = r.abs().reshape(-1, m)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(1, g.topk(n, dim=1).indices, True)
    return keep.reshape(w.shape)


def quantized(w: torch.Tensor, method: str, bits: int, extra: dict[str, Any]) -> torch.Tensor:
    if method == "quant_noise":
        return fake_int(w, bits, "channel", True)
    return block_quant(w, method, bits, extra.get("mx_element", "int"))[0]


def mask_for(src: torch.Tensor, sparsity: str) -> torch.Tensor:
    if sparsity == "50%":
        return magnitude_mask(src, 0.5)
    nm = nm_mask(src)
    return torch.ones_like(src, dtype=torch.bool) if nm is None else nm


def matrix_check(seeds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, (method, bits, extra) in FORMATS.items():
        for sp in SPARSITY:
            sq, qs = [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                w = torch.distributions.StudentT(torch.tensor(3.0)).sample((256, 512))
                m_s = mask_for(w, sp)
                a = quantized(w * m_s, method, bits, extra)
                q = quantized(w, method, bits, extra)
                b = q * mask_for(q, sp)
                sq.append(float((a - w).norm() / w.norm()))
                qs.append(float((b - w).norm() / w.norm()))
            out[f"{label} @ {sp}"] = {"sq": statistics.mean(sq), "qs": statistics.mean(qs)}
    return out


def measure(model: nn.Module, val: Any, spec: ModelSpec) -> float:
    data = ckpt.encode(model.cpu(), model_spec=spec)
    return evaluate(ckpt.decode(data).model, make_loader(val, 512, shuffle=False), CPU).loss


def wrapped(
    base: nn.Module,
    method: str,
    bits: int,
    extra: dict[str, Any],
    sparsity: str | None,
    order: str,
    tune: Any = None,
) -> nn.Module:
    """A copy of ``base`` quantized (``bits`` < 32) or not, pruned with masks taken in
    ``order``, then fine-tuned by ``tune`` (masks fixed, quantization in the loop)."""
    m = copy.deepcopy(base)
    layers = {i.name: LayerPolicy(bits=bits, sparsity=0.0) for i in compressible_layers(m)}
    quant.apply(m, Policy(layers=layers, method=method, noise_rate=1.0, order=order, **extra))
    m.eval()
    if sparsity is None:
        return finetuned(m, tune)
    for name in layers:
        module = m.get_submodule(name)
        pm = parametrization(module)
        w = module.parametrizations.weight.original.detach()
        src = w if order == "sq" or bits == 32 else quantized(w, method, bits, extra)
        pm.mask.copy_(mask_for(src, sparsity).float())  # type: ignore[union-attr,operator]
        if hasattr(pm, "dense"):
            pm.dense = False
    return finetuned(m, tune)


def finetuned(m: nn.Module, tune: Any) -> nn.Module:
    if tune is not None:
        tune(m)
    m.eval()
    return m


def model_check(
    seeds: int, epochs: int, width: int, ft_epochs: int
) -> dict[str, list[dict[str, float]]]:
    train, val = digits()
    spec = ModelSpec(builtin="digits-cnn", kwargs={"width": width})
    res: dict[str, list[dict[str, float]]] = defaultdict(list)
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = digits_cnn(width=width)
        loader = make_loader(train, 64, shuffle=True, seed=seed)
        train_epochs(base, loader, epochs=epochs, lr=3e-3, device=CPU)
        f = measure(base, val, spec)

        def tune(m: nn.Module, loader: Any = loader) -> None:
            if ft_epochs:
                train_epochs(m, loader, epochs=ft_epochs, lr=1e-3, device=CPU)

        s_only = {
            sp: measure(wrapped(base, "quant_noise", 32, {}, sp, "sq", tune), val, spec) - f
            for sp in SPARSITY
        }
        for label, (method, bits, extra) in FORMATS.items():
            q_only = measure(wrapped(base, method, bits, extra, None, "sq", tune), val, spec) - f
            for sp in SPARSITY:
                sq = measure(wrapped(base, method, bits, extra, sp, "sq", tune), val, spec) - f
                qs = measure(wrapped(base, method, bits, extra, sp, "qs", tune), val, spec) - f
                res[f"{label} @ {sp}"].append({"S": s_only[sp], "Q": q_only, "SQ": sq, "QS": qs})
        print(f"seed {seed} done", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--record", action="store_true", help=f"rewrite its section of {DOC}")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    mat = matrix_check(args.seeds)
    lines = [
        f"Part 1: heavy-tailed (Student-t, 3 dof) 256x512 matrix, relative L2 error, mean of "
        f"{args.seeds} seeds.",
        "",
        "| format @ sparsity | S->Q | Q->S | Q->S - S->Q |",
        "|---|---:|---:|---:|",
    ]
    for k, v in mat.items():
        lines.append(f"| {k} | {v['sq']:.4f} | {v['qs']:.4f} | {v['qs'] - v['sq']:+.4f} |")
    res = model_check(args.seeds, args.epochs, args.width, args.finetune_epochs)
    lines += [
        "",
        f"Part 2: digits CNN (width {args.width}, {args.epochs} epochs, {args.seeds} seeds), "
        f"{args.finetune_epochs} fine-tune epochs per row (masks fixed, full-STE quantization "
        "in the loop), measured on the decoded checkpoint: Delta NLL against float "
        "(mean ± std). Non-orthogonal when Delta(S->Q) > Delta(S) + Delta(Q).",
        "",
        "| format @ sparsity | ΔS | ΔQ | ΔS + ΔQ | Δ(S->Q) | Δ(Q->S) | S->Q better in |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    figures: dict[str, Any] = {
        "matrix": {k: {a: round(b, 4) for a, b in v.items()} for k, v in mat.items()}
    }
    figures["model"] = {}
    for k, rs in res.items():

        def ms(key: str, rs: list[dict[str, float]] = rs) -> str:
            v = [r[key] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):+.3f} ± {sd:.3f}"

        mean = {key: statistics.mean(r[key] for r in rs) for key in ("S", "Q", "SQ", "QS")}
        wins = sum(r["SQ"] < r["QS"] for r in rs)
        lines.append(
            f"| {k} | {ms('S')} | {ms('Q')} | {mean['S'] + mean['Q']:+.3f} | {ms('SQ')} | "
            f"{ms('QS')} | {wins}/{len(rs)} |"
        )
        figures["model"][k] = {key: round(v, 4) for key, v in mean.items()}
    elapsed = time.perf_counter() - started
    text = "\n".join(lines)
    print(text)
    print(f"\nwall time {elapsed:.0f} s")
    if args.record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = f".venv/bin/python bench/reproduce_order.py {' '.join(sys.argv[1:])}".rstrip()
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
