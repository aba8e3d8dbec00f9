"""The config side of a compression method: what a policy says about it, which knobs a
search space searches for it and what the rest of sparq may ask of it.

Pure pydantic (the service imports it without torch). The torch side, the handler that
wraps a layer, fine-tunes and encodes, lives in ``workers/compress/quant/`` and is registered for
the config class (``workers.compress.quant.register_handler``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from search_spaces._space import KnobSpace

FLOAT_BITS = 32
FORMATS: tuple[str, ...] = ("sparq", "onnx")


class NoKnobs(BaseModel):
    """The searchable knobs of a method that has none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodConfig(BaseModel):
    """One method's knobs in a policy (``Policy.method``), discriminated by ``name``.

    Subclasses declare ``name: Literal["..."] = "..."`` and may override the class
    variables and hooks below; the defaults describe a method without knobs that
    reports at every early-stopping rung and exports only the ``.sparq`` checkpoint.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str

    # Order in the registry (and in the docs' table, the Optuna space); ties by name.
    rank: ClassVar[int] = 100
    # One line for docs/compression.md's method table.
    description: ClassVar[str] = ""
    # Whether the model in eval mode during fine-tuning is the model exported, so the
    # trial may report at early-stopping rungs (iPQ quantizes after its epochs, GETA
    # counts steps: they report once).
    reports_at_rungs: ClassVar[bool] = True
    # Export formats (``export.formats``) this method's checkpoints can be written as.
    export_formats: ClassVar[frozenset[str]] = frozenset({"sparq"})
    # Flat ``Policy`` fields of policies written before methods were configs -> the
    # field of this config they meant (``""``: a mapping spread into the config).
    legacy_fields: ClassVar[dict[str, str]] = {}
    # What a search space may search for this method (lists of choices, ranges):
    # ``KnobSpace.method_knobs[name]`` / ``search_space.method_knobs[name]``, validated
    # by this model. The methods older than the registry keep their flat spellings too.
    Knobs: ClassVar[type[BaseModel]] = NoKnobs

    @model_serializer(mode="wrap")
    def _with_name(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Always write ``name``, also under ``exclude_defaults`` (a checkpoint header):
        it is the discriminator a reader needs."""
        out = handler(self)
        return {"name": self.name, **out} if isinstance(out, dict) else out

    @classmethod
    def knobs(cls, method_knobs: dict[str, dict[str, Any]]) -> BaseModel:
        """This method's entry of a space's ``method_knobs``, validated (defaults when
        the space has none)."""
        return cls.Knobs.model_validate(method_knobs.get(cls.model_fields["name"].default, {}))

    def channel_multiple(self) -> int:
        """Structured pruning removes channels in multiples of this (iPQ's sub-vectors
        must tile the surviving input channels)."""
        return 1

    def summary(self) -> dict[str, str]:
        """This method's knobs as flat MLflow params (``Policy.summary``)."""
        return {}

    @classmethod
    def distributions(cls, space: KnobSpace) -> dict[str, BaseDistribution]:
        """Optuna distributions of this method's searched knobs in ``space`` (a fixed
        knob is not a search dimension)."""
        return {}

    @classmethod
    def from_params(cls, space: KnobSpace, params: dict[str, Any]) -> MethodConfig:
        """The config a set of sampled parameters stands for in ``space``."""
        return cls.model_validate({"name": cls.model_fields["name"].default})


def choices(name: str, values: list[Any]) -> dict[str, BaseDistribution]:
    """``{name: categorical}`` when there is a choice to make, else nothing."""
    from optuna.distributions import CategoricalDistribution

    return {name: CategoricalDistribution(list(values))} if len(values) > 1 else {}


_REGISTRY: dict[str, type[MethodConfig]] = {}
C = TypeVar("C", bound=type[MethodConfig])


def register_method(cls: C) -> C:
    """Class decorator: make a config class a method (keyed by its ``name``)."""
    config: type[MethodConfig] = cls
    name = config.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}.name needs its method name as default")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"method {name!r} is registered twice")
    _REGISTRY[name] = cls
    return cls


def registered() -> dict[str, type[MethodConfig]]:
    """The registered methods, in rank order."""
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].rank, kv[0])))
