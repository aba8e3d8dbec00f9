"""The compression policy: what one trial applies to a model, layer by layer.

A policy is the single description shared by the search (which samples it), the
compression engine (which applies it), MLflow (which logs it) and the exported
checkpoint (which stores it as JSON).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from search_spaces.methods import FLOAT_BITS, MethodConfig
from search_spaces.methods import METHODS as METHOD_CLASSES
from search_spaces.methods.geta import GetaSettings
from search_spaces.methods.quant_noise import QuantNoiseConfig

METHODS: tuple[str, ...] = tuple(METHOD_CLASSES)
if TYPE_CHECKING:
    Method = str
    AnyMethod = MethodConfig
else:
    Method = Literal[METHODS]
    # the registered configs, told apart by `name`
    AnyMethod = Annotated[
        Union.__getitem__(tuple(METHOD_CLASSES.values())), Field(discriminator="name")
    ]
# flat fields of policies written before methods were configs (every method's knobs)
LEGACY_FIELDS: frozenset[str] = frozenset(
    k for cls in METHOD_CLASSES.values() for k in cls.legacy_fields
)
SparsityKind = Literal["unstructured", "2:4", "1:4"]
SPARSITY_KINDS: tuple[str, ...] = ("unstructured", "2:4", "1:4", "channel")
NM_KINDS: dict[str, tuple[int, int]] = {"2:4": (2, 4), "1:4": (1, 4)}
__all__ = ["FLOAT_BITS", "GetaSettings", "LayerPolicy", "Policy"]


def lift_flat_method(data: Any) -> Any:
    """A policy as written before methods were configs (``method`` a name, the knobs of
    every method top-level) -> ``method`` a config holding its own knobs; the other
    methods' knobs (inert there) are dropped. Anything else is returned as is."""
    if not isinstance(data, Mapping):
        return data
    flat = {k: data[k] for k in LEGACY_FIELDS if k in data}
    name = data.get("method", QuantNoiseConfig.model_fields["name"].default)
    if not isinstance(name, str):
        return data  # a config already (flat fields beside it are refused as extra)
    cls = METHOD_CLASSES.get(name)
    config: dict[str, Any] = {"name": name}
    for key, value in flat.items():
        target = cls.legacy_fields.get(key) if cls else None
        if target == "" and isinstance(value, BaseModel | Mapping):
            config.update(value.model_dump() if isinstance(value, BaseModel) else value)
        elif target == "":
            config[key] = value  # not a mapping: refused, named, by the config
        elif target is not None:
            config[target] = value
    rest = {k: v for k, v in data.items() if k not in LEGACY_FIELDS}
    return {**rest, "method": config}


class LayerPolicy(BaseModel):
    """Compression of one layer's weight: sparsity first, then quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(description="weight bits: 2..8, or 32 to keep the layer float")
    sparsity: float = Field(ge=0.0, lt=1.0, description="fraction of weights pruned (exact top-k)")
    kind: SparsityKind = Field(
        default="unstructured",
        description="in-layer sparsity: unstructured magnitude top-k, or N:M along the "
        "reduction dimension (then `sparsity` is 1 - N/M)",
    )

    @model_validator(mode="after")
    def _nm_fraction(self) -> LayerPolicy:
        if self.kind in NM_KINDS:
            n, m = NM_KINDS[self.kind]
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"kind {self.kind!r} prunes exactly {1 - n / m} of the weights, "
                    f"but sparsity={self.sparsity}; set sparsity to {1 - n / m}"
                )
        return self

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == FLOAT_BITS):
            raise ValueError(f"bits must be in 2..8 or {FLOAT_BITS} (float), but got {v}")
        return v


class Policy(BaseModel):
    """Per-layer policy plus the quantization-noise settings used while fine-tuning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: dict[str, LayerPolicy]
    noise_rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Quant-Noise p: fraction of blocks quantized"
    )
    noise_block: int = Field(default=4, ge=1, description="Quant-Noise block size (Linear/1x1)")
    method: AnyMethod = Field(
        default_factory=QuantNoiseConfig,
        description="the method (workers/compress/quant/) and its knobs, told apart by `name`",
    )
    act_bits: int = Field(default=FLOAT_BITS, description="activation bits: 2..8, or 32 (float)")
    act_range: Literal["calibrated", "learned"] = "calibrated"

    @model_validator(mode="before")
    @classmethod
    def _flat_method(cls, data: Any) -> Any:
        """Checkpoints, job-store rows and MLflow records of older sparqs hold flat
        policies; they validate to the same policy."""
        return lift_flat_method(data)

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == FLOAT_BITS):
            raise ValueError(f"act_bits must be in 2..8 or {FLOAT_BITS} (float), but got {v}")
        return v

    channels: dict[str, float] = Field(
        default_factory=dict,
        description="structured pruning: fraction of channels removed per prunable group "
        "(keyed by the group's name, its first layer); applied before everything else",
    )

    @field_validator("channels")
    @classmethod
    def _channel_fractions(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: f for k, f in v.items() if not 0.0 <= f < 1.0}
        if bad:
            raise ValueError(f"channel fractions must lie in [0, 1), but got {bad}")
        return v

    def compact_json(self) -> dict[str, Any]:
        """The smallest JSON that validates back to this policy, as a checkpoint header
        stores it: a method whose knobs all have flat spellings (every method older than
        method configs) is written flat, as sparq wrote it then, so no file grew when
        methods became configs; any other method as its nested config."""
        out = self.model_dump(mode="json", exclude_defaults=True)
        nested = self.method.model_dump(mode="json", exclude_defaults=True)
        nested.pop("name", None)
        legacy = type(self.method).legacy_fields
        whole = [key for key, target in legacy.items() if target == ""]
        flat = {target: key for key, target in legacy.items() if target}
        out.pop("method", None)
        if whole:  # one flat field holds the whole config (geta)
            if nested:
                out[whole[0]] = nested
        elif all(k in flat for k in nested):
            out |= {flat[k]: v for k, v in nested.items()}
        else:
            out["method"] = {"name": self.method.name, **nested}
            return out
        if self.method.name != QuantNoiseConfig.model_fields["name"].default:
            out["method"] = self.method.name
        return out

    def summary(self) -> dict[str, str]:
        """Flat string view for MLflow params (one entry per knob)."""
        out = {"noise_rate": f"{self.noise_rate:.4g}", "noise_block": str(self.noise_block)}
        out |= {"method": self.method.name, "act_bits": str(self.act_bits)}
        out |= self.method.summary()
        if self.act_bits != FLOAT_BITS:
            out["act_range"] = self.act_range
        for name, lp in self.layers.items():
            out[f"{name}.bits"] = str(lp.bits)
            out[f"{name}.sparsity"] = f"{lp.sparsity:.4g}"
            if lp.kind != "unstructured":
                out[f"{name}.kind"] = lp.kind
        for group, frac in self.channels.items():
            out[f"group:{group}.channels"] = f"{frac:.4g}"
        return out
