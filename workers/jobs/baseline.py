"""Work the search driver does besides the trials: describe the model, train the
float baseline once, re-measure an exported checkpoint, export it to ONNX. A module
of its own so that the Ray worker running it imports only what it needs (torch and
the engine), never Tune or MLflow: those cost a cold worker about 3 s, on the path
of every job."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dashboards import quality
from service.spec import JobSpec
from service.tasks import get_task

if TYPE_CHECKING:
    import numpy as np
    import torch

    from search_spaces import KnobSpace
    from service.weights import Roots
    from workers.compress.train import EvalResult, Teacher

EVAL_BATCH = 512
CHANCE_MARGIN = 1.25  # a quality at most this many times chance's is "near chance"


# What this module hands the driver (and the driver the trials). Plain frozen
# dataclasses of builtins and numpy arrays: they cross Ray's task boundary by pickle,
# and a field is read by name, so a misspelt key fails at type-check, not mid-search.


@dataclass(frozen=True)
class ModelDescription:
    """What the search space is built from, known before any training
    (:func:`describe_model`)."""

    layers: list[dict[str, Any]]  # the compressible layers (``LayerInfo`` dumps)
    pruning_report: dict[str, Any]  # prunable channel groups, layers left dense and why
    size_bytes: int  # the float checkpoint's bytes: the same trained or not
    # layer -> the block size it takes instead of one its width does not divide, and why
    adjusted: dict[str, str] = field(default_factory=dict)

    @property
    def left_dense(self) -> dict[str, str]:
        """Layers structured pruning leaves dense, with the reason (the job says them)."""
        dense: dict[str, str] = self.pruning_report["dense"]
        return dense

    @property
    def groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.pruning_report["groups"]
        return groups


@dataclass(frozen=True)
class Baseline:
    """The trained float baseline (:func:`train_baseline`): every trial starts from
    ``state``, and its measurements are the reference of the front and the constraints."""

    state: dict[str, np.ndarray]
    accuracy: float
    quality: float  # the front's quality axis (``dashboards.quality``: exp(-loss) for an LM)
    loss: float
    train_loss: float | None  # the last epoch's; None when it was not trained further
    warm_start: str | None  # ``baseline.weights``, when the user's weights were the start
    size_bytes: int
    # the quality of the model as it arrived, before baseline training (None: not trained)
    start_quality: float | None = None
    # what went wrong in its training that the job must say (a collapsed baseline)
    warnings: list[str] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        """Everything but the weights, as JSON keeps it (``baseline.json``); the fields
        added since (``start_quality``, ``warnings``) only when they say something, so a
        kept baseline reads as it always did."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "state"}
        if out["start_quality"] is None:
            del out["start_quality"]
        if not out["warnings"]:
            del out["warnings"]
        return out


@dataclass(frozen=True)
class Reevaluation:
    """An exported checkpoint measured again from its file (:func:`reevaluate`); the
    ``info_*`` fields are :func:`workers.jobs.checkpoint.size_report`'s."""

    accuracy: float
    loss: float
    size_bytes: int
    info_size_bytes: float
    info_header_bytes: float
    info_bound_bytes: float
    info_ratio: float  # bytes over the information bound

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def load_baseline(spec: JobSpec, state: dict[str, np.ndarray]) -> torch.nn.Module:
    """The job's model with the baseline's weights."""
    import numpy as np
    import torch

    from workers.zoo.models import build_model

    model = build_model(spec.model)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model


def teacher_for(spec: JobSpec, state: dict[str, np.ndarray]) -> Teacher | None:
    """A distillation job's teacher: the float baseline (None for other tasks)."""
    from service.tasks import get_task
    from workers.compress.train import Teacher

    if not get_task(spec.task).needs_teacher:
        return None
    return Teacher(load_baseline(spec, state), spec.distillation.loss)


def teacher_meta(spec: JobSpec) -> dict[str, Any]:
    """What a distillation job's checkpoints say of their teacher, so that
    ``sparq evaluate`` measures them against the same one: the loss it compared
    outputs by, and whether it was the model as its spec builds it (a pretrained
    model as it arrives) or a state dict (``baseline.weights``, which the checkpoint
    does not hold). Nothing for other tasks."""
    from service.tasks import get_task

    if not get_task(spec.task).needs_teacher:
        return {}
    source = "baseline.weights" if spec.baseline.weights else "model"
    return {"teacher": {"loss": spec.distillation.loss, "source": source}}


def job_model(spec: JobSpec) -> torch.nn.Module | None:
    """A fresh model of the job's own spec for decoding the job's checkpoints: an
    entrypoint comes from the spec the user submitted, never from the file."""
    from workers.zoo.models import build_model

    return build_model(spec.model) if spec.model.entrypoint else None


def evaluate_bytes(
    data: bytes, spec: JobSpec, device: torch.device, teacher: Teacher | None = None
) -> EvalResult:
    """Decode checkpoint bytes and evaluate the model they hold (against ``teacher``
    for a distillation job)."""
    from workers.compress.train import evaluate, make_loader
    from workers.jobs import checkpoint as ckpt
    from workers.zoo.data import build_datasets

    _, val = build_datasets(spec.dataset)
    model = ckpt.decode(data, model=job_model(spec)).model
    loader = make_loader(val, EVAL_BATCH, shuffle=False)
    return evaluate(model, loader, device, spec.task, teacher)


def describe_model(spec: JobSpec) -> ModelDescription:
    """What the search space is built from, known before any training: the model's
    compressible layers, its prunable channel groups (and the layers left dense, with
    why) and the size of its float checkpoint. None of it depends on the weights, so
    the driver computes it on the untrained model while the baseline trains."""
    import torch

    from workers.compress.batch import example
    from workers.compress.engine import (
        block_adjustments,
        compressible_layers,
        float_parameters,
        tied_layers,
    )
    from workers.compress.pruning import analyze
    from workers.jobs import checkpoint as ckpt
    from workers.zoo.data import build_datasets
    from workers.zoo.models import FromConv1D, build_model

    torch.manual_seed(spec.search.seed)
    model = build_model(spec.model)
    train, _ = build_datasets(spec.dataset)
    report = analyze(model, example(train)).as_dict()  # prunable groups; dense ones, why
    report["dense"].update(float_parameters(model))  # weights outside the layers: float
    data = ckpt.encode(model, model_spec=spec.model, dataset_spec=spec.dataset, task=spec.task)
    adjusted = block_adjustments(model, _blocks(spec))
    for name, module in model.named_modules():
        if isinstance(module, FromConv1D):
            adjusted.setdefault(
                name,
                "a transformers Conv1D: compressed as the nn.Linear it is (its weight stored "
                "[out, in]); the checkpoint reloads it so",
            )
    for alias, source in tied_layers(model).items():
        adjusted[alias] = (
            f"its weight is {source}'s (tied): compressed as {source} is, with its policy, "
            "and stored once"
        )
    return ModelDescription(
        layers=[info.model_dump() for info in compressible_layers(model)],
        pruning_report=report,
        size_bytes=len(data),  # float32 payload: the same bytes trained or not
        adjusted=adjusted,
    )


def _blocks(spec: JobSpec) -> dict[str, list[int]]:
    """The block sizes the job's methods may use on a layer's input (iPQ's only when
    iPQ is searched)."""
    ss = spec.search_space
    blocks = {"noise_block": [ss.noise_block]}
    if "ipq" in ss.methods:
        blocks["ipq block"] = list(ss.ipq.block_sizes)
    return blocks


def knob_space(spec: JobSpec, model: ModelDescription) -> KnobSpace:
    """The job's search space over a :func:`describe_model` description: what the
    driver searches (and the benches too, to search the same space)."""
    return spec.search_space.knob_space(model.layers, model.groups)


def _why(e: Exception) -> str:
    """A load error in one line: torch's weights-only refusal is paragraphs of advice
    (with terminal colours) around the one line that says what it met."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    said = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    if said:
        return f"torch.load(weights_only=True) refused it: {said.group(1).strip()}"
    return " ".join(text.split())[:500]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pt``/``.pth`` (``torch.load(weights_only=True)``: tensors
    only, never arbitrary objects) or ``.npz`` (no pickle); a checkpoint dict holding
    it under ``state_dict`` or ``model`` is accepted too. ``ValueError`` (the rule)
    otherwise. The service checks an upload with it too."""
    import numpy as np
    import torch

    try:
        if str(path).endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                state: Any = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unreadable, not a state dict, or holding non-tensor objects
        raise ValueError(f"cannot be read as a state dict: {_why(e)}") from None
    if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        state = next((state[k] for k in ("state_dict", "model") if k in state), state)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError("must hold a mapping of parameter names to tensors")
    if not state:
        raise ValueError("must hold a mapping of parameter names to tensors, not nothing")
    return state


def load_weights(model: torch.nn.Module, path: str, roots: Roots | None = None) -> None:
    """Load a user's state dict (:func:`read_state_dict`) into ``model`` strictly: every
    key, every shape. ``path`` is ``baseline.weights``: an uploaded id or a server
    path, checked again here against ``roots`` (the service's, from the driver; the
    environment's settings without) before anything is opened."""
    from service import weights as wt
    from service.settings import get_settings
    from workers.errors import SpecError

    field = f"baseline.weights={path!r}"
    try:
        real = wt.check(path, roots or wt.Roots.of(get_settings()), None, owner_checked=False)
        state = read_state_dict(real)
    except FileNotFoundError:
        raise SpecError(f"{field}: no such file on this worker") from None
    except (wt.Refused, ValueError) as e:
        raise SpecError(f"{field}: {e}") from None
    from workers.zoo.models import FromConv1D

    for name, module in model.named_modules():  # written by the model with its Conv1Ds
        key = f"{name}.weight"
        if isinstance(module, FromConv1D) and key in state and state[key].dim() == 2:
            state[key] = state[key].t().contiguous()
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [
        f"{k}: {tuple(state[k].shape)} given, {tuple(want[k].shape)} expected"
        for k in sorted(set(want) & set(state))
        if state[k].shape != want[k].shape
    ]
    if missing or unexpected or shapes:
        raise SpecError(
            f"{field} does not fit the model: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, shape mismatches {shapes[:8]}"
        )
    model.load_state_dict(state)


def train_baseline(spec_json: dict[str, Any], roots: Roots | None = None) -> Baseline:
    """Ray task: the float baseline, trained once (or taken as it arrived: a pretrained
    model or given weights with ``baseline.epochs`` 0); returns its weights and
    measurements. A baseline that training left below its starting quality, or near
    chance, is kept but said in ``warnings`` (the job shows them): it is not silently
    compressed. ``roots``: where the service lets ``baseline.weights`` be read from."""
    import copy

    import torch

    from workers.compress.train import (
        Teacher,
        evaluate,
        make_loader,
        pick_device,
        set_threads,
        train_epochs,
    )
    from workers.jobs import checkpoint as ckpt
    from workers.zoo.data import build_datasets
    from workers.zoo.models import build_model

    spec = JobSpec.model_validate(spec_json)
    set_threads(spec.resources.cpus)
    device = pick_device(spec.resources.gpus)
    torch.manual_seed(spec.search.seed)
    model = build_model(spec.model)
    if spec.baseline.weights:  # warm start: the user's trained weights
        load_weights(model, spec.baseline.weights, roots)
    train, val = build_datasets(spec.dataset)
    val_loader = make_loader(val, EVAL_BATCH, shuffle=False)
    epochs = spec.baseline.train_epochs  # 0: the model as it arrived
    losses: list[float] = []
    start: float | None = None
    if epochs:
        before = evaluate(model, val_loader, device, spec.task)
        start = quality(spec.task, {"accuracy": before.accuracy, "loss": before.loss})
        losses = train_epochs(
            model,
            make_loader(train, spec.baseline.batch_size, shuffle=True, seed=spec.search.seed),
            epochs=epochs,
            lr=spec.baseline.lr,
            device=device,
            task=spec.task,
            schedule=spec.lr_schedule,
        )
    model.cpu()
    data = ckpt.encode(model, model_spec=spec.model, dataset_spec=spec.dataset, task=spec.task)
    reloaded = ckpt.decode(data, model=job_model(spec)).model
    teacher = None
    if get_task(spec.task).needs_teacher:  # the float model is its own teacher: cosine 1
        teacher = Teacher(copy.deepcopy(model), spec.distillation.loss)
    result = evaluate(reloaded, val_loader, device, spec.task, teacher)
    measured = quality(spec.task, {"accuracy": result.accuracy, "loss": result.loss})
    return Baseline(
        state={k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
        accuracy=result.accuracy,
        quality=measured,
        loss=result.loss,
        train_loss=losses[-1] if losses else None,
        warm_start=spec.baseline.weights,
        size_bytes=len(data),
        start_quality=start,
        warnings=collapse_warnings(spec, reloaded, val, start, measured),
    )


def chance_quality(spec: JobSpec, model: torch.nn.Module, val: Any) -> float | None:
    """What guessing scores on the task's quality axis: 1 / classes for
    classification, 1 / vocabulary for language modelling (``exp(-loss)`` of a uniform
    guess); None for a task without a chance level (distillation)."""
    import torch

    from workers.compress import batch as B

    if spec.task not in ("classification", "language_modeling"):
        return None
    model.eval()
    with torch.no_grad():
        out = B.forward(model, B.example(val))
    classes = int(out.shape[-1])
    return 1.0 / classes if classes > 1 else None


def collapse_warnings(
    spec: JobSpec, model: torch.nn.Module, val: Any, start: float | None, measured: float
) -> list[str]:
    """The job's warnings about a baseline training wrecked: below the quality the
    model started from, or near chance (at most ``CHANCE_MARGIN`` x chance)."""
    label = get_task(spec.task).quality_label
    said: list[str] = []
    if start is not None and measured < start:
        said.append(
            f"the float baseline collapsed in training: its {label} fell from {start:.4f} "
            f"(as it arrived) to {measured:.4f} after baseline.epochs="
            f"{spec.baseline.train_epochs} at baseline.lr={spec.baseline.lr:g}; a pretrained "
            "model wants baseline.epochs: 0 (model.pretrained: true) or a small lr (3e-5)"
        )
    chance = chance_quality(spec, model, val)
    if chance is not None and measured <= CHANCE_MARGIN * chance:
        said.append(
            f"the float baseline is near chance: its {label} is {measured:.4f}, chance is "
            f"{chance:.4f}; the search compresses a model that has learned nothing"
        )
    return said


def reevaluate(
    path: str, spec_json: dict[str, Any], baseline_dir: str | None = None
) -> Reevaluation:
    """Ray task: reload an exported checkpoint from disk and measure it again. A
    distillation job measures it against its teacher, the baseline kept in
    ``baseline_dir`` (default: the checkpoint's directory, the job's)."""
    from workers.compress.train import pick_device, set_threads
    from workers.jobs import checkpoint as ckpt

    spec = JobSpec.model_validate(spec_json)
    set_threads(spec.resources.cpus)
    data = Path(path).read_bytes()
    ckpt.decode(data, model=job_model(spec))  # validates the header before anything else
    teacher = None
    if get_task(spec.task).needs_teacher:
        kept = load_saved_baseline(Path(baseline_dir or Path(path).parent))
        if kept is None:
            raise RuntimeError(f"no kept float baseline (the teacher) in {baseline_dir}")
        teacher = teacher_for(spec, kept.state)
    result = evaluate_bytes(data, spec, pick_device(spec.resources.gpus), teacher)
    info = {f"info_{k}": float(v) for k, v in ckpt.size_report(data).items()}
    return Reevaluation(accuracy=result.accuracy, loss=result.loss, size_bytes=len(data), **info)


def export_onnx(path: str, out: str, spec_json: dict[str, Any]) -> dict[str, float]:
    """Ray task: the exported checkpoint as an int8 QDQ ONNX model, checked against torch
    in onnxruntime on validation inputs."""
    from workers.compress.batch import first_n
    from workers.jobs import checkpoint as ckpt
    from workers.jobs.onnx_export import export_qdq
    from workers.zoo.data import build_datasets

    spec = JobSpec.model_validate(spec_json)
    _, val = build_datasets(spec.dataset)
    inputs = first_n(val, 64)
    report = export_qdq(ckpt.load_checkpoint(path, model=job_model(spec)), out, inputs)
    return {
        "rel_diff": report.rel_diff,
        "rel_diff_optimized": report.rel_diff_optimized,
        "top1_agreement": report.top1_agreement,
        "bytes": float(report.size_bytes),
    }


_STATE, _META = "baseline.npz", "baseline.json"


def save_baseline(job_dir: Path, baseline: Baseline) -> None:
    """Keep the trained baseline in the job's directory (arrays in ``.npz``, the rest in
    JSON; no pickle), written atomically, so a resumed driver never trains it again."""
    import numpy as np

    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f".{_STATE}.tmp"
    arrays: dict[str, Any] = baseline.state  # savez's own keywords typed in: names only here
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    (job_dir / f".{_META}.tmp").write_text(json.dumps(baseline.meta()))
    tmp.replace(job_dir / _STATE)
    (job_dir / f".{_META}.tmp").replace(job_dir / _META)


def load_saved_baseline(job_dir: Path) -> Baseline | None:
    """The baseline :func:`save_baseline` kept, or None if there is none (complete)."""
    import numpy as np

    if not (job_dir / _STATE).exists() or not (job_dir / _META).exists():
        return None
    with np.load(job_dir / _STATE, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    return Baseline(state=state, **json.loads((job_dir / _META).read_text()))
