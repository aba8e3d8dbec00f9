"""Knob spaces derived from a model's layers, and their translation to Optuna.

The space is a validated value object with a JSON round trip (pydantic); the one
converter to Optuna's sampling is :func:`to_optuna`, and the one converter back
from sampled parameters to a :class:`Policy` is :func:`policy_from_params`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search_spaces._policy import (
    METHODS,
    NM_KINDS,
    SPARSITY_KINDS,
    GetaSettings,
    LayerPolicy,
    Policy,
)

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


class LayerInfo(BaseModel):
    """What the search needs to know about one compressible layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str  # "linear" | "conv2d"
    numel: int = Field(ge=1)
    sparsity_kinds: list[str] = Field(
        default_factory=lambda: ["unstructured"],
        description="in-layer sparsity kinds this layer supports (N:M needs the reduction "
        "dimension to be a multiple of M)",
    )


class GroupInfo(BaseModel):
    """A group of coupled layers whose channels are pruned together (structured pruning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the group's first layer in module order
    channels: int = Field(ge=1)
    layers: list[str]
    heads: int = Field(default=1, ge=1, description="> 1: an attention embedding dimension")


class KnobSpace(BaseModel):
    """The joint space: per-layer weight bits and sparsity, plus the noise rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[LayerInfo]
    weight_bits: list[int]
    sparsity_low: float = Field(ge=0.0, lt=1.0)
    sparsity_high: float = Field(ge=0.0, lt=1.0)
    noise_rate_low: float = Field(ge=0.0, le=1.0)
    noise_rate_high: float = Field(ge=0.0, le=1.0)
    noise_block: int = Field(ge=1)
    sparsity_kinds: list[str] = Field(default_factory=lambda: ["unstructured"])
    groups: list[GroupInfo] = Field(default_factory=list)
    channel_low: float = Field(default=0.0, ge=0.0, lt=1.0)
    channel_high: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Method knobs (workers/quant/): each list with more than one value is searched.
    methods: list[str] = Field(default_factory=lambda: ["quant_noise"])
    granularities: list[str] = Field(default_factory=lambda: ["channel"])
    symmetric: list[bool] = Field(default_factory=lambda: [True])
    ipq_blocks: list[int] = Field(default_factory=lambda: [4])
    ipq_centroids: list[int] = Field(default_factory=lambda: [16])
    mx_elements: list[str] = Field(default_factory=lambda: ["int"])
    order: str = "sq"
    act_bits: list[int] = Field(default_factory=lambda: [32])
    act_range: str = "calibrated"
    geta: GetaSettings = Field(default_factory=GetaSettings)
    geta_sparsity_low: float = Field(default=0.3, ge=0.0, lt=1.0)
    geta_sparsity_high: float = Field(default=0.3, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> KnobSpace:
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad:
            raise ValueError(f"methods must name one or more of {list(METHODS)}, but got {bad}")
        if self.geta_sparsity_low > self.geta_sparsity_high:
            raise ValueError(
                "`geta_sparsity_low <= geta_sparsity_high` must hold, but got "
                f"(low={self.geta_sparsity_low}, high={self.geta_sparsity_high})"
            )
        unknown = sorted(set(self.sparsity_kinds) - set(SPARSITY_KINDS))
        if unknown:
            raise ValueError(
                f"sparsity kinds {unknown} are not known; choose from {list(SPARSITY_KINDS)}"
            )
        if self.channel_low > self.channel_high:
            raise ValueError(
                "`channel_low <= channel_high` must hold, but got "
                f"(low={self.channel_low}, high={self.channel_high})"
            )
        if not self.layers:
            raise ValueError("the model has no compressible layer (Linear or Conv2d)")
        if not self.weight_bits:
            raise ValueError("weight_bits must name at least one bit width")
        if self.sparsity_low > self.sparsity_high:
            raise ValueError(
                "`sparsity_low <= sparsity_high` must hold, but got "
                f"(low={self.sparsity_low}, high={self.sparsity_high})"
            )
        if self.noise_rate_low > self.noise_rate_high:
            raise ValueError(
                "`noise_rate_low <= noise_rate_high` must hold, but got "
                f"(low={self.noise_rate_low}, high={self.noise_rate_high})"
            )
        return self


def to_optuna(space: KnobSpace) -> dict[str, BaseDistribution]:
    """Optuna distributions for every knob; a fixed knob becomes a one-value choice."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    def _float(lo: float, hi: float) -> BaseDistribution:
        return CategoricalDistribution([lo]) if lo == hi else FloatDistribution(lo, hi)

    dists: dict[str, BaseDistribution] = {}
    for layer in space.layers:
        dists[f"{layer.name}.bits"] = CategoricalDistribution(sorted(space.weight_bits))
        kinds = layer_kinds(space, layer)
        if len(kinds) > 1:
            dists[f"{layer.name}.kind"] = CategoricalDistribution(kinds)
        if "unstructured" in kinds:
            dists[f"{layer.name}.sparsity"] = _float(space.sparsity_low, space.sparsity_high)
    if "channel" in space.sparsity_kinds:
        for group in space.groups:
            dists[f"group:{group.name}.channels"] = _float(space.channel_low, space.channel_high)
    dists["noise_rate"] = _float(space.noise_rate_low, space.noise_rate_high)
    choices: dict[str, list[Any]] = {
        "method": space.methods,
        "granularity": space.granularities,
        "symmetric": space.symmetric,
        "ipq_block": space.ipq_blocks,
        "ipq_centroids": space.ipq_centroids,
        "mx_element": space.mx_elements,
        "act_bits": space.act_bits,
    }
    for key, values in choices.items():
        if len(values) > 1:  # a fixed method knob is not a search dimension
            dists[key] = CategoricalDistribution(list(values))
    if "geta" in space.methods and space.geta_sparsity_low < space.geta_sparsity_high:
        dists["geta_sparsity"] = FloatDistribution(
            space.geta_sparsity_low, space.geta_sparsity_high
        )
    return dists


def layer_kinds(space: KnobSpace, layer: LayerInfo) -> list[str]:
    """In-layer sparsity kinds the search may pick for a layer: the ones the job asks
    for that the layer supports. Empty means the layer stays dense (no in-layer mask)."""
    return [k for k in space.sparsity_kinds if k != "channel" and k in layer.sparsity_kinds]


def policy_from_params(space: KnobSpace, params: dict[str, Any]) -> Policy:
    """Build the policy a set of sampled parameters stands for."""
    layers = {}
    for layer in space.layers:
        kinds = layer_kinds(space, layer)
        kind = str(params.get(f"{layer.name}.kind", kinds[0] if kinds else "unstructured"))
        if kind in NM_KINDS:
            n, m = NM_KINDS[kind]
            sparsity = 1 - n / m
        else:
            sparsity = float(params[f"{layer.name}.sparsity"]) if kinds else 0.0
        layers[layer.name] = LayerPolicy(
            bits=int(params[f"{layer.name}.bits"]), sparsity=sparsity, kind=kind
        )
    geta = space.geta.model_copy(
        update={
            "target_group_sparsity": float(params.get("geta_sparsity", space.geta_sparsity_low))
        }
    )
    channels = {}
    if "channel" in space.sparsity_kinds:
        channels = {g.name: float(params[f"group:{g.name}.channels"]) for g in space.groups}
    return Policy(
        layers=layers,
        noise_rate=float(params["noise_rate"]),
        noise_block=space.noise_block,
        method=params.get("method", space.methods[0]),
        granularity=params.get("granularity", space.granularities[0]),
        symmetric=bool(params.get("symmetric", space.symmetric[0])),
        ipq_block=int(params.get("ipq_block", space.ipq_blocks[0])),
        ipq_centroids=int(params.get("ipq_centroids", space.ipq_centroids[0])),
        mx_element=params.get("mx_element", space.mx_elements[0]),
        order=space.order,
        act_bits=int(params.get("act_bits", space.act_bits[0])),
        act_range=space.act_range,
        geta=GetaSettings.model_validate(geta.model_dump()),
        channels=channels,
    )
