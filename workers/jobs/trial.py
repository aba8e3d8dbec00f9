"""One trial's work, without Ray or MLflow: apply a policy to the shared float baseline
(sparsity first, then quantization), fine-tune under quantization noise, export the
checkpoint, and measure the checkpoint itself: accuracy of the decoded, fully
quantized model and its exact size in bytes. The Tune trainable that runs it is
:func:`workers.search.trials.run_trial`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from search_spaces import Policy
from service.spec import JobSpec
from workers.compress import quant
from workers.compress.batch import example as example_of
from workers.compress.train import evaluate, make_loader
from workers.jobs import checkpoint as ckpt
from workers.jobs.baseline import (
    EVAL_BATCH,
    job_model,
    load_baseline,
    teacher_for,
    teacher_meta,
)
from workers.zoo.data import build_datasets

CHECKPOINT_FILE = "model.sparq"
RESULT_FILE = "result.json"
RESULTS_DIR = "results"  # jobs/JOB/results/TRIAL_ID/{model.sparq,result.json}
OUTBOX_DIR = "outbox"  # jobs/JOB/outbox: see workers/search/outbox.py
REPORTED = frozenset({"accuracy", "loss", "size_bytes", "duration_s"})  # a trial's metrics


def compress(
    spec: JobSpec,
    policy: Policy,
    baseline_state: dict[str, np.ndarray],
    device: torch.device,
    *,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
    on_model: Callable[[torch.nn.Module, Callable[[], bytes]], None] | None = None,
    meta: dict[str, Any] | None = None,
    datasets: tuple[Dataset, Dataset] | None = None,
) -> tuple[bytes, dict[str, float]]:
    """A trial's work without Ray or MLflow: prune channels (structured, first), apply
    the policy's method to the survivors, fine-tune as the method says, export, and
    measure the decoded checkpoint. Returns the checkpoint bytes and the metrics
    (accuracy, loss, perplexity, size_bytes, information bound, params, BOPs).

    ``on_model(model, encode_now)`` sees the wrapped model before it is trained, with
    a function that exports it as it stands. ``datasets``: the spec's ``(train, val)``
    when the caller built them already (built here otherwise)."""
    train, val = datasets if datasets is not None else build_datasets(spec.dataset)
    example = example_of(train)
    model = load_baseline(spec, baseline_state)
    teacher = teacher_for(spec, baseline_state)  # distillation: the float model
    pruning: list[dict[str, Any]] = []
    if policy.channels:  # structured first: quantizers are attached to the survivors
        from workers.compress.pruning import prune_channels

        # N:M groups, noise blocks and the method's own (iPQ's sub-vectors) tile the
        # surviving channels
        multiple = math.lcm(4, policy.noise_block, policy.method.channel_multiple())
        pruning = prune_channels(model, policy.channels, example, multiple_of=multiple)
    model = quant.apply(model, policy)

    meta = {**(meta or {}), **teacher_meta(spec)}

    def encode_now() -> bytes:
        return ckpt.encode(
            model.cpu(),
            model_spec=spec.model,
            dataset_spec=spec.dataset,
            task=spec.task,
            policy=policy,
            meta=meta,
            pruning=pruning,
            example=example,
        )

    if on_model is not None:
        on_model(model, encode_now)
    ss = spec.search_space
    learned = quant.finetune(
        model,
        policy,
        make_loader(train, spec.baseline.batch_size, shuffle=True, seed=seed),
        epochs=ss.finetune_epochs,
        lr=ss.finetune_lr,
        device=device,
        on_epoch=on_epoch,
        seed=seed,
        task=spec.task,
        teacher=teacher,
        lr_schedule=spec.lr_schedule,
    )
    cost = quant.count_bops(model, example)
    data = encode_now()
    decoded = ckpt.decode(data, model=job_model(spec)).model  # an entrypoint: from the spec
    loader = make_loader(val, EVAL_BATCH, shuffle=False)
    result = evaluate(decoded, loader, device, spec.task, teacher)
    bound = ckpt.size_report(data)
    metrics = {
        **result.metrics(spec.task),  # the task's own (distillation: cosine)
        "accuracy": result.accuracy,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "size_bytes": len(data),
        "info_bound_bytes": bound["bound_bytes"],
        "bytes_over_bound": bound["ratio"],
        "params": sum(p.numel() for p in decoded.parameters()),
        "bops": cost.bops,
        "relative_bops": cost.relative,
    }
    if "geta_trace" in learned:
        metrics["group_sparsity"] = learned["geta_trace"].group_sparsity
    return data, metrics
