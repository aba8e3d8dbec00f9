"""Work the search driver hands to Ray besides the trials: train the float baseline
once, and re-measure an exported checkpoint. A module of its own so that the Ray
worker running it imports only what it needs (torch and the engine), not Tune or
MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.spec import JobSpec, front_quality


def train_baseline(spec_json: dict[str, Any]) -> dict[str, Any]:
    """Ray task: train the float model once; return its weights and measurements."""
    import torch

    from workers import checkpoint as ckpt
    from workers.data import build_datasets, example_input
    from workers.engine import compressible_layers
    from workers.models import build_model
    from workers.pruning import analyze
    from workers.train import evaluate, make_loader, train_epochs
    from workers.trial import pick_device, set_threads

    spec = JobSpec.model_validate(spec_json)
    set_threads(spec.resources.cpus)
    device = pick_device(spec.resources.gpus)
    torch.manual_seed(spec.search.seed)
    model = build_model(spec.model)
    train, val = build_datasets(spec.dataset)
    losses = train_epochs(
        model,
        make_loader(train, spec.baseline.batch_size, shuffle=True, seed=spec.search.seed),
        epochs=spec.baseline.epochs,
        lr=spec.baseline.lr,
        device=device,
    )
    model.cpu()
    data = ckpt.encode(model, model_spec=spec.model, dataset_spec=spec.dataset, task=spec.task)
    result = evaluate(ckpt.decode(data).model, make_loader(val, 512, shuffle=False), device)
    report = analyze(model, example_input(train))  # prunable groups; layers left dense, why
    return {
        "state": {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        "accuracy": result.accuracy,
        "quality": front_quality(spec.task, result.accuracy, result.loss),
        "pruning_report": report.as_dict(),
        "loss": result.loss,
        "train_loss": losses[-1],
        "size_bytes": len(data),
        "layers": [info.model_dump() for info in compressible_layers(model)],
    }


def reevaluate(path: str, spec_json: dict[str, Any]) -> dict[str, float]:
    """Ray task: reload an exported checkpoint from disk and measure it again."""
    from workers import checkpoint as ckpt
    from workers.trial import evaluate_bytes, pick_device, set_threads

    spec = JobSpec.model_validate(spec_json)
    set_threads(spec.resources.cpus)
    data = Path(path).read_bytes()
    ckpt.decode(data)  # validates the header before anything else
    result = evaluate_bytes(data, spec, pick_device(spec.resources.gpus))
    out = {"accuracy": result.accuracy, "loss": result.loss, "size_bytes": len(data)}
    out.update({f"info_{k}": float(v) for k, v in ckpt.size_report(data).items()})
    return out


_STATE, _META = "baseline.npz", "baseline.json"


def save_baseline(job_dir: Path, baseline: dict[str, Any]) -> None:
    """Keep the trained baseline in the job's directory (arrays in ``.npz``, the rest in
    JSON; no pickle), written atomically, so a resumed driver never trains it again."""
    import numpy as np

    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f".{_STATE}.tmp"
    with tmp.open("wb") as f:
        np.savez(f, **baseline["state"])
    meta = {k: v for k, v in baseline.items() if k != "state"}
    (job_dir / f".{_META}.tmp").write_text(json.dumps(meta))
    tmp.replace(job_dir / _STATE)
    (job_dir / f".{_META}.tmp").replace(job_dir / _META)


def load_saved_baseline(job_dir: Path) -> dict[str, Any] | None:
    """The baseline :func:`save_baseline` kept, or None if there is none (complete)."""
    import numpy as np

    if not (job_dir / _STATE).exists() or not (job_dir / _META).exists():
        return None
    with np.load(job_dir / _STATE, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    return {**json.loads((job_dir / _META).read_text()), "state": state}
