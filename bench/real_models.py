"""Real models (issue 14, item 6): all-MiniLM-L6-v2 compressed by sparq's search
against what a user does without sparq, side by side in one run on the same held-out
sentences; and the char-LM's size ratio at <= 5 % perplexity increase.

MiniLM rows, every one measured the same way: bytes of a file really written to disk,
and the mean cosine similarity between each held-out sentence's embedding (the
encoder's last hidden state, mean-pooled over the attention mask, as
sentence-transformers does) and the float model's.

- float32: ``torch.save(state_dict)`` of the model as it ships.
- fp16 cast: every floating tensor cast to float16, saved; run in float32 after
  loading (the weights are the fp16 ones).
- int8 PTQ per channel: every Linear and Embedding weight quantized symmetric per
  output channel (per row for the embedding) to int8 with a float32 scale, the rest
  float32; saved as int8 + scales; dequantized to run.
- int8 PTQ per channel + xz: that int8 PTQ file compressed with Python's ``lzma`` at
  its default preset (bytes of the ``.xz`` file), decompressed to run: the peer of a
  general-purpose entropy coder on top, as sparq entropy-codes its own codes.
- torch dynamic int8: ``torch.ao.quantization.quantize_dynamic`` of the Linear layers
  (embeddings stay float32), its state dict saved, the quantized model run.
- torchao int8 weight-only: ``torchao.quantization.quantize_(Int8WeightOnlyConfig())``
  (Linear layers), its state dict saved, the model run (the row says why when torchao
  is not installed or fails; it is the ``bench`` extra).
- sparq: the job spec of docs/minilm.yaml (task distillation, the job's knob space
  with ``--bits`` as its weight bits if given,
  the job's Optuna sampler: ``workers.search.sampling.make_sampler``) searched for
  ``--trials`` trials, each trial ``workers.jobs.trial.compress`` (prune, Quant-Noise
  fine-tune against the float teacher on the training sentences, export), run in
  this process one after another (no Ray, no MLflow: the same trial work the service
  runs); each ``.sparq`` checkpoint written to disk, reloaded and measured like the
  others (and checked against the trial's reported cosine).

The char-LM (builtin ``char-lm`` on ``python-text``): a float baseline trained here,
then the same in-process search on its own job spec; the ratio is float checkpoint
bytes / smallest trial checkpoint with perplexity <= 1.05 x the float one.

With ``--repro`` it also runs the papers' comparisons on MiniLM for
docs/reproduction.md: sparsity then quantization against quantization then sparsity
(Harma et al.) and Quant-Noise against plain full-STE QAT (Fan, Stock et al.), each a
fixed policy through ``workers.jobs.trial.compress`` for ``--seeds`` seeds.

Usage::

    .venv/bin/python bench/real_models.py --quick            # minutes
    .venv/bin/python bench/real_models.py [--repro] [--record]  # the full run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import lzma
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from bench._doc import machine  # noqa: E402

CPU = torch.device("cpu")
PEERS = (
    "fp16 cast",
    "int8 PTQ per channel",
    "int8 PTQ per channel + xz",
    "torch dynamic int8",
    "torchao int8 weight-only",
)


# ---------------------------------------------------------------- measuring


def embeddings(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled last hidden states over the attention mask, float32."""
    out = []
    model.eval()
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state.float()
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a, b, dim=1).mean())


def saved_bytes(obj: Any, path: Path) -> int:
    torch.save(obj, path)
    return path.stat().st_size


# ---------------------------------------------------------------- peers


def fp16_row(model: nn.Module, tmp: Path) -> tuple[int, nn.Module]:
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    size = saved_bytes(state, tmp / "fp16.pt")
    back = torch.load(tmp / "fp16.pt", weights_only=True)
    m = copy.deepcopy(model)
    m.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in back.items()})
    return size, m


def int8_ptq_row(model: nn.Module, tmp: Path) -> tuple[int, nn.Module]:
    """Symmetric per-output-channel int8 of every Linear and Embedding weight."""
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Embedding)}
    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.endswith(".weight") and k.removesuffix(".weight") in layers:
            scale = (v.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            state[k + ".int8"] = torch.clamp(torch.round(v / scale), -127, 127).to(torch.int8)
            state[k + ".scale"] = scale.squeeze(1).float()
        else:
            state[k] = v
    size = saved_bytes(state, tmp / "int8_ptq.pt")
    return size, _int8_ptq_model(model, tmp / "int8_ptq.pt")


def _int8_ptq_model(model: nn.Module, path: Path) -> nn.Module:
    """A copy of ``model`` with the dequantized weights of an int8 PTQ file."""
    back = torch.load(path, weights_only=True)
    deq = {}
    for k, v in back.items():
        if k.endswith(".int8"):
            base = k.removesuffix(".int8")
            deq[base] = v.float() * back[base + ".scale"].unsqueeze(1)
        elif not k.endswith(".scale"):
            deq[k] = v
    m = copy.deepcopy(model)
    m.load_state_dict(deq)
    return m


def int8_ptq_xz_row(model: nn.Module, tmp: Path) -> tuple[int, nn.Module]:
    """The int8 PTQ file compressed with xz (``lzma``, default preset): its ``.xz``
    bytes on disk; decompressed and dequantized to run."""
    int8_ptq_row(model, tmp)
    xz = tmp / "int8_ptq.pt.xz"
    xz.write_bytes(lzma.compress((tmp / "int8_ptq.pt").read_bytes()))
    unpacked = tmp / "int8_ptq_from_xz.pt"
    unpacked.write_bytes(lzma.decompress(xz.read_bytes()))
    return xz.stat().st_size, _int8_ptq_model(model, unpacked)


def dynamic_row(model: nn.Module, tmp: Path) -> tuple[int, nn.Module]:
    from torch.ao.quantization import quantize_dynamic

    q = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    return saved_bytes(q.state_dict(), tmp / "dynamic.pt"), q


def torchao_row(model: nn.Module, tmp: Path) -> tuple[int, nn.Module]:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    m = copy.deepcopy(model)
    quantize_(m, Int8WeightOnlyConfig())
    return saved_bytes(m.state_dict(), tmp / "torchao.pt"), m


# ---------------------------------------------------------------- sparq


def minilm_spec(args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "minilm.yaml").read_text())
    spec["dataset"]["kwargs"] = {
        "train_size": args.train_size,
        "val_size": args.val_size,
        "max_length": args.max_length,
    }
    spec["search"] = {**spec["search"], "trials": args.trials, "seed": args.seed}
    if args.finetune_epochs:
        spec["search_space"]["finetune_epochs"] = args.finetune_epochs
    if args.bits:
        spec["search_space"]["weight_bits"] = args.bits
    spec["resources"] = {"cpus": torch.get_num_threads()}
    spec.update(over)
    return spec


def search(
    spec_json: dict[str, Any], trials: int, tmp: Path, label: str, log: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """The job's baseline, then ``trials`` trials of the job's knob space sampled by
    the job's Optuna sampler (the driver's), each ``workers.jobs.trial.compress``.
    Returns the baseline and one row per trial (its checkpoint written to ``tmp``)."""
    import optuna

    from search_spaces import policy_from_params, to_optuna
    from service.spec import JobSpec
    from workers.jobs.baseline import describe_model, knob_space, train_baseline
    from workers.jobs.trial import compress
    from workers.search.sampling import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = JobSpec.model_validate(spec_json)
    t0 = time.perf_counter()
    base = train_baseline(spec_json)
    log(
        f"{label}: baseline quality {base.accuracy:.4f}, loss {base.loss:.4f} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    space = knob_space(spec, describe_model(spec))
    dists = to_optuna(space)
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=make_sampler(spec, len(dists))
    )
    rows = []
    for i in range(trials):
        t = time.perf_counter()
        trial = study.ask(dists)
        policy = policy_from_params(space, trial.params)
        try:
            data, m = compress(spec, policy, base.state, CPU, seed=spec.search.seed + i)
        except Exception as e:  # a failed trial is a row too
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            rows.append({"trial": i, "failed": f"{type(e).__name__}: {e}"})
            log(f"{label} trial {i}: FAILED {type(e).__name__}: {e}")
            continue
        path = tmp / f"{label}-{i}.sparq"
        path.write_bytes(data)
        study.tell(trial, [m["accuracy"], m["size_bytes"]])
        rows.append(
            {
                "trial": i,
                "path": path,
                "size_bytes": path.stat().st_size,
                "reported_quality": m["accuracy"],
                "loss": m["loss"],
                "perplexity": m.get("perplexity"),
                "policy": _policy_summary(policy),
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        log(
            f"{label} trial {i}: {rows[-1]['size_bytes']} B, quality {m['accuracy']:.4f}, "
            f"loss {m['loss']:.4f}, {rows[-1]['policy']} ({rows[-1]['seconds']} s)"
        )
    return base, rows


def _policy_summary(policy: Any) -> str:
    bits = sorted({lp.bits for lp in policy.layers.values()})
    sp = [lp.sparsity for lp in policy.layers.values()]
    kinds = sorted({lp.kind for lp in policy.layers.values() if lp.sparsity > 0})
    ch = f", channels {max(policy.channels.values()):.2f}" if policy.channels else ""
    return (
        f"bits {bits}, sparsity {min(sp):.2f}-{max(sp):.2f} {kinds}, "
        f"noise {policy.noise_rate:.2f}{ch}"
    )


def ratio_at(float_bytes: int, rows: list[dict[str, Any]], ok: Any) -> float | None:
    sizes = [r["size_bytes"] for r in rows if "size_bytes" in r and ok(r)]
    return round(float_bytes / min(sizes), 2) if sizes else None


# ---------------------------------------------------------------- MiniLM


def run_minilm(args: argparse.Namespace, tmp: Path, log: Any) -> dict[str, Any]:
    from workers.jobs import checkpoint as ckpt
    from workers.zoo.minilm import minilm, python_sentences

    _, val = python_sentences(args.train_size, args.val_size, args.max_length)
    batches = [{k: v[i : i + 64] for k, v in val.encoded.items()} for i in range(0, len(val), 64)]
    model = minilm()
    ref = embeddings(model, batches)
    float_bytes = saved_bytes(model.state_dict(), tmp / "float32.pt")
    rows: dict[str, dict[str, Any]] = {"float32": {"bytes": float_bytes, "cosine": 1.0}}
    makers = {
        "fp16 cast": fp16_row,
        "int8 PTQ per channel": int8_ptq_row,
        "int8 PTQ per channel + xz": int8_ptq_xz_row,
        "torch dynamic int8": dynamic_row,
        "torchao int8 weight-only": torchao_row,
    }
    for name, make in makers.items():
        t = time.perf_counter()
        try:
            size, m = make(model, tmp)
            c = cosine(embeddings(m, batches), ref)
            rows[name] = {
                "bytes": size,
                "cosine": round(c, 5),
                "ratio": round(float_bytes / size, 2),
            }
        except Exception as e:  # torchao missing or failing: the row says why
            rows[name] = {"skipped": f"{type(e).__name__}: {e}"}
        log(f"minilm {name}: {rows[name]} ({time.perf_counter() - t:.0f} s)")
    base, trials = search(minilm_spec(args), args.trials, tmp, "minilm", log)
    for r in trials:
        if "path" not in r:
            continue
        ck = ckpt.load_checkpoint(r["path"])
        r["cosine"] = round(cosine(embeddings(ck.model, batches), ref), 5)
        r["ratio"] = round(float_bytes / r["size_bytes"], 2)
        # the trial measured itself against the same teacher on the same sentences
        r["matches_reported"] = abs(r["cosine"] - r["reported_quality"]) < 1e-4
        if not r["matches_reported"]:
            log(
                f"minilm trial {r['trial']}: reloaded cosine {r['cosine']} differs from "
                f"the reported {r['reported_quality']}"
            )
    peers = {k: v for k, v in rows.items() if k in PEERS}

    def best_peer(th: float) -> float | None:
        ok = [v["ratio"] for v in peers.values() if "ratio" in v and v["cosine"] >= th]
        return max(ok) if ok else None

    return {
        "float_bytes": float_bytes,
        "sparq_float_checkpoint_bytes": base.size_bytes,
        "size_ratio_at_cos95": ratio_at(float_bytes, trials, lambda r: r["cosine"] >= 0.95),
        "size_ratio_at_cos98": ratio_at(float_bytes, trials, lambda r: r["cosine"] >= 0.98),
        "best_peer_ratio_at_cos95": best_peer(0.95),
        "best_peer_ratio_at_cos98": best_peer(0.98),
        "peers": peers,
        "sparq_trials": [{k: v for k, v in r.items() if k != "path"} for r in trials],
        "sentences": {"train": args.train_size, "val": args.val_size, "tokens": args.max_length},
    }


# ---------------------------------------------------------------- char-LM


def run_char_lm(args: argparse.Namespace, tmp: Path, log: Any) -> dict[str, Any]:
    spec = {
        "name": "char-lm-bench",
        "model": {"builtin": "char-lm", "kwargs": {"dim": 64, "depth": 2}},
        "dataset": {"builtin": "python-text", "kwargs": {"max_chars": args.lm_chars}},
        "task": "language_modeling",
        "baseline": {"epochs": args.lm_epochs, "lr": 0.003, "batch_size": 32},
        "search_space": {
            "preset": "joint",
            "weight_bits": [2, 3, 4, 6, 8],
            "sparsity": {"low": 0.0, "high": 0.5},
            "finetune_epochs": 2,
            "finetune_lr": 0.001,
        },
        "constraints": {"max_accuracy_drop": None},
        "search": {"trials": args.lm_trials, "seed": args.seed},
        "resources": {"cpus": torch.get_num_threads()},
    }
    base, trials = search(spec, args.lm_trials, tmp, "char-lm", log)
    import math

    ppl = math.exp(base.loss)
    ok = [r for r in trials if "loss" in r]
    for r in ok:
        r["ppl_ratio"] = round(math.exp(r["loss"]) / ppl, 4)
        r["ratio"] = round(base.size_bytes / r["size_bytes"], 2)
    return {
        "float_bytes": base.size_bytes,
        "float_perplexity": round(ppl, 4),
        "size_ratio_at_ppl105": ratio_at(base.size_bytes, ok, lambda r: r["ppl_ratio"] <= 1.05),
        "trials": [{k: v for k, v in r.items() if k != "path"} for r in trials],
    }


# ---------------------------------------------------------------- the papers' rows


def run_repro(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """S->Q vs Q->S and Quant-Noise vs full-STE QAT on MiniLM: fixed policies (every
    Linear and the embeddings at ``--repro-bits``; 50 % unstructured sparsity for the
    order pair) through ``workers.jobs.trial.compress``, ``--seeds`` seeds each."""
    from search_spaces import LayerPolicy, Policy
    from service.spec import JobSpec
    from workers.compress.engine import compressible_layers
    from workers.jobs.baseline import train_baseline
    from workers.jobs.trial import compress
    from workers.zoo.minilm import minilm

    spec_json = minilm_spec(args)
    spec = JobSpec.model_validate(spec_json)
    base = train_baseline(spec_json)
    names = [i.name for i in compressible_layers(minilm())]
    arms = {
        "S->Q": (0.5, "sq", 1.0),
        "Q->S": (0.5, "qs", 1.0),
        "QAT (p=1)": (0.0, "sq", 1.0),
        "Quant-Noise (p=0.5)": (0.0, "sq", 0.5),
    }
    out: dict[str, list[float]] = {a: [] for a in arms}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm, (sparsity, order, p) in arms.items():
            lp = LayerPolicy(bits=args.repro_bits, sparsity=sparsity)
            policy = Policy(layers=dict.fromkeys(names, lp), noise_rate=p, order=order)
            t = time.perf_counter()
            _, m = compress(spec, policy, base.state, CPU, seed=seed)
            out[arm].append(m["accuracy"])
            log(
                f"repro seed {seed} {arm}: cosine {m['accuracy']:.4f}, {m['size_bytes']} B "
                f"({time.perf_counter() - t:.0f} s)"
            )
    return {
        "bits": args.repro_bits,
        "seeds": args.seeds,
        "cosine": {a: [round(v, 5) for v in vs] for a, vs in out.items()},
        "mean": {a: round(statistics.mean(vs), 5) for a, vs in out.items()},
    }


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: small everything")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--val-size", type=int, default=256)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: the spec's")
    p.add_argument(
        "--bits",
        type=lambda v: [int(b) for b in v.split(",")],
        default=None,
        help="MiniLM's weight_bits, e.g. 3,4,6,8 (default: docs/minilm.yaml's)",
    )
    p.add_argument("--lm-trials", type=int, default=10)
    p.add_argument("--lm-epochs", type=int, default=8)
    p.add_argument("--lm-chars", type=int, default=60_000)
    p.add_argument("--repro", action="store_true", help="the papers' rows on MiniLM")
    p.add_argument("--repro-bits", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="--repro's seeds start here")
    p.add_argument("--repro-only", action="store_true", help="only the papers' rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-char-lm", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.trials, args.train_size, args.val_size, args.max_length = 3, 64, 64, 24
        args.lm_trials, args.lm_epochs, args.lm_chars, args.seeds = 3, 2, 12_000, 1
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {msg}", flush=True)

    log(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="sparq-real-") as d:
        tmp = Path(d)
        result: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["bench/real_models.py", *sys.argv[1:]]),
        }
        if not args.repro_only:
            result["minilm"] = run_minilm(args, tmp, log)
        if not (args.skip_char_lm or args.repro_only):
            result["char_lm"] = run_char_lm(args, tmp, log)
        if args.repro or args.repro_only:
            result["repro"] = run_repro(args, log)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
