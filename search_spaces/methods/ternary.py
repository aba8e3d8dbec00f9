"""``ternary``: ternary weights (Li et al., "Ternary Weight Networks", 2016): per output
channel ``{-a, 0, +a}``, zero below a threshold of ``threshold * mean|w|``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from search_spaces.methods._base import MethodConfig, choices, register_method

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from search_spaces._space import KnobSpace

MAX_THRESHOLD = 1.5  # above ~1.5 * mean|w| nearly every weight is zero


class TernaryKnobs(BaseModel):
    """What a search space may search: the threshold factors to choose from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    thresholds: list[float] = Field(default_factory=lambda: [0.7], min_length=1, max_length=16)

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        bad = [t for t in v if not 0.0 < t <= MAX_THRESHOLD]
        if bad:
            raise ValueError(f"ternary thresholds must lie in (0, {MAX_THRESHOLD}], but got {bad}")
        return v


@register_method
class TernaryConfig(MethodConfig):
    """Per-layer bits are ignored (2-bit codes); per-layer sparsity masks are kept and
    the threshold zeroes more."""

    name: Literal["ternary"] = "ternary"
    threshold: float = Field(
        default=0.7, gt=0.0, le=MAX_THRESHOLD, description="zero below threshold * mean|w|"
    )

    rank: ClassVar[int] = 5
    description: ClassVar[str] = "ternary {-a, 0, +a} per channel, threshold * mean abs"
    Knobs: ClassVar[type[BaseModel]] = TernaryKnobs

    def summary(self) -> dict[str, str]:
        return {"ternary_threshold": f"{self.threshold:.4g}"}

    @classmethod
    def _knobs(cls, space: KnobSpace) -> TernaryKnobs:
        knobs = cls.knobs(space.method_knobs)
        assert isinstance(knobs, TernaryKnobs)
        return knobs

    @classmethod
    def distributions(cls, space: KnobSpace) -> dict[str, BaseDistribution]:
        return choices("ternary_threshold", cls._knobs(space).thresholds)

    @classmethod
    def from_params(cls, space: KnobSpace, params: dict[str, Any]) -> TernaryConfig:
        default = cls._knobs(space).thresholds[0]
        return cls(threshold=float(params.get("ternary_threshold", default)))
