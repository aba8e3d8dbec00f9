"""GETA's constraints at small scale (Qu et al., CVPR 2025): once projection starts,
every layer's bit width stays inside ``[b_l, b_u']`` (the current upper bound, which
shrinks to ``b_u``), and the final group sparsity is exactly the target.

Digits CNN: train the float model, then run GETA's four stages from it (method
``geta`` through :func:`workers.compress.quant.apply` /
:func:`workers.compress.quant.finetune`, as a
trial does), export to ``.sparq``, decode, evaluate. Per seed: bit-bound violations
counted over every step after projection starts, group sparsity achieved vs target,
final bits per layer, accuracy of float vs the decoded GETA model, relative BOPs.
A per-period trace of seed 0 shows the bits converging.

Usage::

    .venv/bin/python bench/reproduce_geta.py [--seeds 3] [--record]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._doc import machine, record_section  # noqa: E402
from search_spaces import LayerPolicy, Policy  # noqa: E402
from search_spaces._policy import GetaSettings  # noqa: E402
from service.spec import ModelSpec  # noqa: E402
from workers.compress import quant  # noqa: E402
from workers.compress.engine import compressible_layers  # noqa: E402
from workers.compress.train import evaluate, make_loader, train_epochs  # noqa: E402
from workers.jobs import checkpoint as ckpt  # noqa: E402
from workers.zoo.data import digits  # noqa: E402
from workers.zoo.models import digits_cnn  # noqa: E402

DOC = ROOT / "docs" / "reproduction.md"
SECTION = "## GETA: bit-width bounds and exact group sparsity (bench/reproduce_geta.py)"
CPU = torch.device("cpu")
TOL = 1e-4  # float rounding of b(d(b))


def run_seed(seed: int, cfg: GetaSettings, width: int, epochs: int) -> dict[str, Any]:
    train, val = digits()
    vl = make_loader(val, 512, shuffle=False)
    spec = ModelSpec(builtin="digits-cnn", kwargs={"width": width})
    torch.manual_seed(seed)
    base = digits_cnn(width=width)
    loader = make_loader(train, 64, shuffle=True, seed=seed)
    train_epochs(base, loader, epochs=epochs, lr=3e-3, device=CPU)
    float_acc = evaluate(base, vl, CPU).accuracy
    m = copy.deepcopy(base)
    layers = {i.name: LayerPolicy(bits=8, sparsity=0.0) for i in compressible_layers(m)}
    policy = Policy(layers=layers, method="geta", geta=cfg)
    quant.apply(m, policy)
    trace = quant.finetune(m, policy, loader, epochs=0, lr=cfg.lr, device=CPU)["geta_trace"]
    bops = quant.count_bops(m, train[0][0].unsqueeze(0))
    data = ckpt.encode(m.cpu(), model_spec=spec, policy=policy)
    acc = evaluate(ckpt.decode(data).model, vl, CPU).accuracy
    violations, checked = 0, 0
    for s in trace.steps:
        if s["stage"] in ("warmup",):
            continue
        for b in s["bits"].values():
            checked += 1
            if not cfg.bit_low - TOL <= b <= s["b_high"] + TOL:
                violations += 1
    after = [s for s in trace.steps if s["stage"] in ("joint", "cooldown")]
    outside_final = sum(
        not cfg.bit_low - TOL <= b <= cfg.bit_high + TOL for s in after for b in s["bits"].values()
    )
    return {
        "float_acc": 100 * float_acc,
        "geta_acc": 100 * acc,
        "relative_bops": bops.relative,
        "size_bytes": len(data),
        "violations": violations,
        "checked": checked,
        "outside_final_range_after_projection": outside_final,
        "target_groups": trace.target_groups,
        "pruned_groups": trace.pruned_groups,
        "total_groups": trace.total_groups,
        "final_bits": trace.final_bits,
        "trace": trace.steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--record", action="store_true", help=f"rewrite its section of {DOC}")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = GetaSettings(
        target_group_sparsity=0.3,
        bit_low=3,
        bit_high=6,
        bit_reduction=3,
        warmup_steps=30,
        projection_steps=80,
        projection_periods=4,
        joint_steps=120,
        pruning_periods=3,
        cooldown_steps=90,
        lr=1e-3,
        quant_lr=1e-3,
    )
    started = time.perf_counter()
    runs = [run_seed(s, cfg, args.width, args.epochs) for s in range(args.seeds)]
    lines = [
        f"digits CNN (width {args.width}, float {args.epochs} epochs), {args.seeds} seeds. "
        f"GETA knobs: {cfg.model_dump()}. Groups: plain output channels of every "
        "quantized layer but the last. Accuracy on the decoded .sparq checkpoint.",
        "",
        "| seed | float acc % | GETA acc % | rel. BOPs | bound violations (steps x layers) "
        "| outside [b_l, b_u] after projection | groups pruned / target / total "
        "| final bits |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(runs):
        lines.append(
            f"| {i} | {r['float_acc']:.2f} | {r['geta_acc']:.2f} | {r['relative_bops']:.4f} | "
            f"{r['violations']} / {r['checked']} | {r['outside_final_range_after_projection']} | "
            f"{r['pruned_groups']} / {r['target_groups']} / {r['total_groups']} | "
            f"{' '.join(str(b) for b in r['final_bits'].values())} |"
        )
    acc = [r["geta_acc"] for r in runs]
    fl = [r["float_acc"] for r in runs]
    sd = statistics.stdev if len(runs) > 1 else (lambda v: 0.0)
    lines += [
        "",
        f"mean accuracy: float {statistics.mean(fl):.2f} ± {sd(fl):.2f}, "
        f"GETA {statistics.mean(acc):.2f} ± {sd(acc):.2f}",
        "",
        "Trace of seed 0 (bits of every layer at the end of each period):",
        "",
        "| step | stage | b_u' | " + " | ".join(runs[0]["final_bits"]) + " |",
        "|---:|---|---:|" + "---:|" * len(runs[0]["final_bits"]),
    ]
    marks = {cfg.warmup_steps - 1}
    per = cfg.projection_steps // cfg.projection_periods
    marks |= {cfg.warmup_steps + per * (k + 1) - 1 for k in range(cfg.projection_periods)}
    j0 = cfg.warmup_steps + cfg.projection_steps
    per_j = cfg.joint_steps // cfg.pruning_periods
    marks |= {j0 + per_j * (k + 1) - 1 for k in range(cfg.pruning_periods)}
    marks.add(len(runs[0]["trace"]) - 1)
    for s in runs[0]["trace"]:
        if s["step"] in marks:
            bits = " | ".join(f"{b:.2f}" for b in s["bits"].values())
            lines.append(f"| {s['step']} | {s['stage']} | {s['b_high']:.0f} | {bits} |")
    elapsed = time.perf_counter() - started
    text = "\n".join(lines)
    print(text)
    print(f"\nwall time {elapsed:.0f} s")
    figures = {k: v for k, v in runs[0].items() if k != "trace"}
    figures["seeds"] = [{k: v for k, v in r.items() if k != "trace"} for r in runs]
    if args.record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = f".venv/bin/python bench/reproduce_geta.py {' '.join(sys.argv[1:])}".rstrip()
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
            ]
        )
        record_section(DOC, SECTION, body, title="# Reproduction")
        print(f"recorded in {DOC}")
    print(json.dumps(figures["seeds"]))


if __name__ == "__main__":
    main()
