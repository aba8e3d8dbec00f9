"""Training-step cost of each quantization method against plain float training.

One model, one fixed batch, the same optimizer (Adam); each method wraps a fresh
copy of the same float model. A step is forward + backward + ``opt.step()``. The
methods are timed side by side: every repeat runs each method's block of steps
in turn (rotating the order), and a method's time is the median over repeats of
its per-step time; ``step_ratio`` = method / float.

Rows: Quant-Noise int8/int4/int2 (p = 0.5, block 8; per-channel symmetric), full-STE
QAT int4 (p = 1), iPQ (training the centroids of quantized layers), GETA (learned
step, clip and exponent), MX int4 and BFP5 (full STE), int8 activation quantization
on top of Quant-Noise int4 and, when torchao is installed, torchao's
``FakeQuantizedLinear`` (int4 per-channel symmetric weights) as a reference.

Usage (from the repository root)::

    .venv/bin/python bench/qat_step.py              # MLP 64-1024-1024-10, batch 256
    .venv/bin/python bench/qat_step.py --quick      # fewer repeats
    .venv/bin/python bench/qat_step.py --record     # also rewrite its section of
                                                    # docs/benchmarks.md

It ends with one JSON line: ``{"step_ratio": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
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
from workers.compress import quant  # noqa: E402
from workers.compress.engine import compressible_layers  # noqa: E402
from workers.compress.quant import ipq  # noqa: E402
from workers.zoo.models import digits_cnn, digits_mlp  # noqa: E402

TARGET = 1.3
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Training-step cost of the quantization methods (bench/qat_step.py)"
_GETA_LONG = {"warmup_steps": 0, "projection_steps": 10**6, "projection_periods": 1}


def _policy(model: nn.Module, method: str, bits: int, **kw: Any) -> Policy:
    layers = {i.name: LayerPolicy(bits=bits, sparsity=0.0) for i in compressible_layers(model)}
    return Policy(layers=layers, method=method, **kw)


def build(name: str, base: nn.Module, x: torch.Tensor) -> nn.Module:
    """A fresh copy of ``base`` wrapped as the row ``name`` says."""
    m = copy.deepcopy(base)
    qn = {"noise_rate": 0.5, "noise_block": 8}
    if name == "float":
        return m
    if name.startswith("quant_noise_int"):
        return quant.apply(m, _policy(m, "quant_noise", int(name[-1]), **qn))
    if name == "qat_int4":
        return quant.apply(m, _policy(m, "quant_noise", 4, noise_rate=1.0))
    if name == "quant_noise_int4_act8":
        quant.apply(m, _policy(m, "quant_noise", 4, act_bits=8, **qn))
        quant.actquant.calibrate(m, [x], torch.device("cpu"))
        return m
    if name == "ipq":
        names = [i.name for i in compressible_layers(m)]
        ipq.quantize_layers(m, names, k=256, block=8)
        return m
    if name == "geta":
        return quant.apply(m, _policy(m, "geta", 8, geta=_GETA_LONG))
    if name == "mx_int4":
        return quant.apply(m, _policy(m, "mx", 4))
    if name == "bfp5":
        return quant.apply(m, _policy(m, "bfp", 5))
    if name == "torchao_qat_int4":
        from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig

        def swap(mod: nn.Module) -> None:
            for child_name, child in mod.named_children():
                if isinstance(child, nn.Linear):
                    cfg = IntxFakeQuantizeConfig(
                        torch.int4, group_size=child.in_features, is_symmetric=True
                    )
                    fq = FakeQuantizedLinear(
                        child.in_features, child.out_features, bias=True, weight_config=cfg
                    )
                    fq.load_state_dict(child.state_dict())
                    setattr(mod, child_name, fq)
                else:
                    swap(child)

        swap(m)
        return m
    raise ValueError(f"unknown row {name!r}")


def stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(
    rows: list[str],
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    repeats: int,
    clock: Callable[[], float],
) -> dict[str, float]:
    steppers = {r: stepper(build(r, base, x), x, y) for r in rows}
    for s in steppers.values():  # warm-up
        for _ in range(3):
            s()
    per: dict[str, list[float]] = {r: [] for r in rows}
    for rep in range(repeats):
        order = rows[rep % len(rows) :] + rows[: rep % len(rows)]
        for r in order:
            t0 = clock()
            for _ in range(steps):
                steppers[r]()
            per[r].append((clock() - t0) / steps)
    return {r: statistics.median(v) for r, v in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this thread's CPU time (robust to other processes on a shared machine; "
        "needs --threads 1), wall: perf_counter",
    )
    p.add_argument("--record", action="store_true", help=f"rewrite its section of {DOC}")
    args = p.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one thread: use --threads 1 or --clock wall")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps, repeats = (4, 5) if args.quick else (5, 15)
    rows = [
        "float",
        "quant_noise_int8",
        "quant_noise_int4",
        "quant_noise_int2",
        "qat_int4",
        "quant_noise_int4_act8",
        "ipq",
        "geta",
        "mx_int4",
        "bfp5",
    ]
    try:
        import torchao.quantization.qat  # noqa: F401

        rows.append("torchao_qat_int4")
    except ImportError:
        print("torchao is not installed: its reference row is left out")
    models = {
        f"digits-mlp 64-{args.hidden}-{args.hidden}-10": digits_mlp(hidden=args.hidden),
        "digits-cnn width 32": digits_cnn(width=32),
    }
    x = torch.rand(args.batch, 1, 8, 8)
    y = torch.randint(0, 10, (args.batch,))
    lines = [
        f"batch {args.batch}, {steps} steps x {repeats} repeats, median per step, "
        f"{args.clock} clock, {args.threads} thread(s)"
    ]
    figures: dict[str, Any] = {}
    for i, (label, base) in enumerate(models.items()):
        model_rows = [r for r in rows if not (r == "torchao_qat_int4" and "cnn" in label)]
        t = measure(model_rows, base, x, y, steps, repeats, clock)
        lines += ["", f"{label}:", "", "| method | ms/step | step ratio |", "|---|---:|---:|"]
        for r in model_rows:
            lines.append(f"| {r} | {1e3 * t[r]:.2f} | {t[r] / t['float']:.3f} |")
        ratios = {r: round(t[r] / t["float"], 3) for r in model_rows if r != "float"}
        figures["step_ratio" if i == 0 else "step_ratio_cnn"] = ratios
        figures["float_ms" if i == 0 else "float_ms_cnn"] = round(1e3 * t["float"], 3)
    worst = max(figures["step_ratio"][f"quant_noise_int{b}"] for b in (8, 4, 2))
    met = "met" if worst <= TARGET else "NOT met"
    lines += ["", f"int-N Quant-Noise worst step ratio: {worst:.3f} (target <= {TARGET}: {met})"]
    figures["model"] = next(iter(models))
    figures["threads"] = args.threads
    figures["clock"] = args.clock
    text = "\n".join(lines)
    print(text)
    if args.record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = " ".join(["bench/qat_step.py", *sys.argv[1:]])
        body = "\n".join(
            [
                SECTION,
                "",
                "Time of one training step (forward, backward, Adam) of each method over "
                "plain float training of the same model on the same batch, timed side by "
                "side (rotating order, median over repeats). Target for int-N Quant-Noise: "
                f"<= {TARGET}x.",
                "",
                f"- Date: {stamp}",
                f"- Machine: {machine()}",
                f"- Command: `.venv/bin/python {cmd}`",
                "",
                text,
                "",
                "```json",
                json.dumps(figures),
                "```",
                "",
            ]
        )
        record_section(DOC, SECTION, body)
        print(f"\nrecorded in {DOC}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
