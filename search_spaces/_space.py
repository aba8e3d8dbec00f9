"""Knob spaces derived from a model's layers, and their translation to Optuna.

The space is a validated value object with a JSON round trip (pydantic); the one
converter to Optuna's sampling is :func:`to_optuna`, and the one converter back
from sampled parameters to a :class:`Policy` is :func:`policy_from_params`.

Knob tying (``KnobSpace.coarsen`` / ``KnobSpace.ties``): layers tied together share
one ``{knob}.bits``, one ``{knob}.sparsity`` and one ``{knob}.kind`` parameter; the
policy stays per layer (every tied layer gets the knob's values). Levels, from the
finest (see :func:`tie_layers` for the knob names):

- ``layer``: one knob set per layer, named after the layer (``{layer}.bits``).
- ``group``: the layers of one dependency group (``GroupInfo.layers``: their output
  channels are pruned together) share ``group:{group}.*``; a layer in no group, or
  alone in its group, keeps ``{layer}.*``.
- ``block``: layers with the same parent module (``blocks.0.conv1`` and
  ``blocks.0.conv2`` -> ``blocks.0``; a top-level layer is its own block), merged with
  the group ties, share ``block:{first block}.*``.
- ``type``: layers of one kind (``linear``, ``conv2d``, ``embedding``), merged with the
  group ties, share ``type:{kind}.*`` (``type:conv2d+linear.*`` when a group couples
  two kinds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from search_spaces._policy import NM_KINDS, SPARSITY_KINDS, LayerPolicy, Policy
from search_spaces.methods import METHODS, check_method_knobs, method_class
from search_spaces.methods.geta import GetaSettings

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


Coarsen = Literal["layer", "group", "block", "type"]
COARSEN_LEVELS: tuple[str, ...] = ("layer", "group", "block", "type")


class KnobSpace(BaseModel):
    """The joint space: weight bits and sparsity per knob (a layer, or layers tied
    together), plus the noise rate and the method knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[LayerInfo]
    coarsen: Coarsen = Field(
        default="layer",
        description="how layers are tied into knobs; `layer` (one knob set per layer) "
        "is the default here so a saved space without it loads as it was searched",
    )
    ties: dict[str, str] = Field(
        default_factory=dict,
        description="layer -> knob name, every layer exactly once; derived from "
        "`coarsen`, `layers` and `groups` when not given",
    )
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
    # Method knobs (workers/compress/quant/): each list with more than one value is searched.
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
    method_knobs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="method name -> its searchable knobs (the method's `Knobs` model); "
        "the flat fields above are the older methods' own spellings",
    )

    @field_validator("method_knobs")
    @classmethod
    def _method_knobs(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return check_method_knobs(v)

    @model_validator(mode="before")
    @classmethod
    def _derive_ties(cls, data: Any) -> Any:
        """Fill ``ties`` from ``coarsen`` when the input has none (a new space, or a
        space saved before knob tying existed: ``coarsen`` then defaults to ``layer``)."""
        if not isinstance(data, Mapping) or data.get("ties"):
            return data
        level = data.get("coarsen", "layer")
        if level not in COARSEN_LEVELS:
            return data  # the field validator names the value and the levels
        try:
            layers = [LayerInfo.model_validate(x) for x in data.get("layers") or []]
            groups = [GroupInfo.model_validate(x) for x in data.get("groups") or []]
        except ValueError:
            return data  # the field validators report the bad layer or group
        return {**data, "ties": tie_layers(level, layers, groups)}

    @model_validator(mode="after")
    def _check(self) -> KnobSpace:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"layers must have distinct names, but {dup} repeat")
        missing = [n for n in names if n not in self.ties]
        unknown = sorted(set(self.ties) - set(names))
        if missing or unknown:
            raise ValueError(
                "ties must map every layer to a knob exactly once, but "
                f"layers {missing} have no knob and {unknown} are not layers of the model"
            )
        empty = sorted(n for n, k in self.ties.items() if not k)
        if empty:
            raise ValueError(f"ties must name a knob for every layer, but {empty} map to ''")
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
    for knob, kinds in knob_kinds(space).items():
        dists[f"{knob}.bits"] = CategoricalDistribution(sorted(space.weight_bits))
        if len(kinds) > 1:
            dists[f"{knob}.kind"] = CategoricalDistribution(kinds)
        if "unstructured" in kinds:
            dists[f"{knob}.sparsity"] = _float(space.sparsity_low, space.sparsity_high)
    if "channel" in space.sparsity_kinds:
        for group in space.groups:
            dists[f"group:{group.name}.channels"] = _float(space.channel_low, space.channel_high)
    dists["noise_rate"] = _float(space.noise_rate_low, space.noise_rate_high)
    if len(space.methods) > 1:
        dists["method"] = CategoricalDistribution(list(space.methods))
    for name in METHODS:  # registry order; each method names its searched knobs
        if name in space.methods:
            dists |= METHODS[name].distributions(space)
    if len(space.act_bits) > 1:
        dists["act_bits"] = CategoricalDistribution(list(space.act_bits))
    return dists


def knob_layers(space: KnobSpace) -> dict[str, list[LayerInfo]]:
    """Each knob and the layers tied to it, knobs in the module order of their first
    layer (with ``coarsen: layer`` exactly the layers, in order)."""
    out: dict[str, list[LayerInfo]] = {}
    for layer in space.layers:
        out.setdefault(space.ties[layer.name], []).append(layer)
    return out


def knob_kinds(space: KnobSpace) -> dict[str, list[str]]:
    """In-layer sparsity kinds each knob may pick: the ones the job asks for that every
    layer tied to it supports. Empty means those layers stay dense (no in-layer mask)."""
    return {
        knob: [
            k
            for k in space.sparsity_kinds
            if k != "channel" and all(k in layer.sparsity_kinds for layer in layers)
        ]
        for knob, layers in knob_layers(space).items()
    }


def layer_kinds(space: KnobSpace, layer: LayerInfo) -> list[str]:
    """In-layer sparsity kinds the search may pick for a layer: the ones the job asks
    for that the layer and every layer tied to it support. Empty means the layer stays
    dense (no in-layer mask)."""
    return knob_kinds(space)[space.ties[layer.name]]


def policy_from_params(space: KnobSpace, params: dict[str, Any]) -> Policy:
    """Build the policy a set of sampled parameters stands for: every layer takes its
    knob's bits, sparsity and kind (tied layers get identical ones)."""
    layers = {}
    all_kinds = knob_kinds(space)
    for layer in space.layers:
        knob = space.ties[layer.name]
        kinds = all_kinds[knob]
        kind = str(params.get(f"{knob}.kind", kinds[0] if kinds else "unstructured"))
        if kind in NM_KINDS:
            n, m = NM_KINDS[kind]
            sparsity = 1 - n / m
        else:
            sparsity = float(params[f"{knob}.sparsity"]) if kinds else 0.0
        layers[layer.name] = LayerPolicy(
            bits=int(params[f"{knob}.bits"]), sparsity=sparsity, kind=kind
        )
    channels = {}
    if "channel" in space.sparsity_kinds:
        channels = {g.name: float(params[f"group:{g.name}.channels"]) for g in space.groups}
    return Policy(
        layers=layers,
        noise_rate=float(params["noise_rate"]),
        noise_block=space.noise_block,
        method=method_class(str(params.get("method", space.methods[0]))).from_params(space, params),
        act_bits=int(params.get("act_bits", space.act_bits[0])),
        act_range=space.act_range,
        channels=channels,
    )


def _parent(name: str) -> str:
    """A layer's block: its parent module path, or its own name at the top level."""
    return name.rpartition(".")[0] or name


def tie_layers(
    coarsen: str, layers: Iterable[LayerInfo], groups: Iterable[GroupInfo] = ()
) -> dict[str, str]:
    """Layer -> knob name at a tying level (see the module docstring).

    A union-find over the level's relation (same parent module for ``block``, same
    kind for ``type``) and, from ``group`` up, the dependency groups (layers whose
    output channels are pruned together). Knob names: ``{layer}`` for a layer alone at
    ``layer``/``group``; ``group:{name}`` (the first group, in the groups' order, that
    ties the layers: a group is named after its first layer in module order, like its
    ``group:{name}.channels`` knob); ``block:{block of the first layer}``;
    ``type:{kinds in module order, joined by +}``.
    """
    if coarsen not in COARSEN_LEVELS:
        raise ValueError(f"coarsen must be one of {list(COARSEN_LEVELS)}, but got {coarsen!r}")
    layers = list(layers)
    groups = list(groups)
    names = [layer.name for layer in layers]
    if coarsen == "layer":
        return {n: n for n in names}
    root = {n: n for n in names}

    def find(x: str) -> str:
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    def union(members: list[str]) -> None:
        for other in members[1:]:
            a, b = find(members[0]), find(other)
            if a != b:
                root[b] = a

    for g in groups:
        union([n for n in g.layers if n in root])
    if coarsen in ("block", "type"):
        by_key: dict[str, list[str]] = {}
        for layer in layers:
            key = _parent(layer.name) if coarsen == "block" else layer.kind
            by_key.setdefault(key, []).append(layer.name)
        for same in by_key.values():
            union(same)
    components: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        components.setdefault(find(layer.name), []).append(layer)
    ties: dict[str, str] = {}
    used: set[str] = set()
    for members in components.values():
        member_names = {m.name for m in members}
        if coarsen == "group":
            first = next((g for g in groups if member_names & set(g.layers)), None)
            knob = members[0].name if len(members) == 1 or first is None else f"group:{first.name}"
        elif coarsen == "block":
            knob = f"block:{_parent(members[0].name)}"
        else:
            knob = "type:" + "+".join(dict.fromkeys(m.kind for m in members))
        if knob in used:  # never for real modules; keeps names unique regardless
            knob = f"{knob}@{members[0].name}"
        used.add(knob)
        ties.update(dict.fromkeys(member_names, knob))
    return {n: ties[n] for n in names}
