"""``geta``: learned bit widths with joint structured pruning (Qu et al., CVPR 2025)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search_spaces.methods._base import MethodConfig, register_method

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from search_spaces._space import KnobSpace


class GetaSettings(BaseModel):
    """GETA's white-box knobs (Qu et al., CVPR 2025); stage lengths count optimizer steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_group_sparsity: float = Field(default=0.3, ge=0.0, lt=1.0)
    bit_low: int = Field(default=4, ge=2, le=8)
    bit_high: int = Field(default=8, ge=2, le=8)
    bit_reduction: int = Field(default=2, ge=1, le=8)
    warmup_steps: int = Field(default=20, ge=0)
    projection_steps: int = Field(default=40, ge=1)
    projection_periods: int = Field(default=4, ge=1)
    joint_steps: int = Field(default=60, ge=1)
    pruning_periods: int = Field(default=3, ge=1)
    cooldown_steps: int = Field(default=60, ge=0)
    lr: float = Field(default=1e-3, gt=0, le=10)
    quant_lr: float = Field(default=1e-3, gt=0, le=10)

    @model_validator(mode="after")
    def _check(self) -> GetaSettings:
        if self.bit_low > self.bit_high:
            raise ValueError(
                "`bit_low <= bit_high` must hold, but got "
                f"(bit_low={self.bit_low}, bit_high={self.bit_high})"
            )
        if self.pruning_periods > self.joint_steps:
            raise ValueError(
                "`pruning_periods <= joint_steps` must hold, but got "
                f"(pruning_periods={self.pruning_periods}, joint_steps={self.joint_steps})"
            )
        if self.projection_periods > self.projection_steps:
            raise ValueError(
                "`projection_periods <= projection_steps` must hold, but got "
                f"(projection_periods={self.projection_periods}, "
                f"projection_steps={self.projection_steps})"
            )
        return self


@register_method
class GetaConfig(MethodConfig, GetaSettings):
    """GETA's settings; per-layer bits, sparsity and the noise rate are ignored."""

    name: Literal["geta"] = "geta"

    rank: ClassVar[int] = 4
    description: ClassVar[str] = "learned bit widths with joint structured pruning"
    reports_at_rungs: ClassVar[bool] = False  # its schedule counts steps, not epochs
    legacy_fields: ClassVar[dict[str, str]] = {"geta": ""}

    def settings(self) -> GetaSettings:
        return GetaSettings(**{k: getattr(self, k) for k in GetaSettings.model_fields})

    def summary(self) -> dict[str, str]:
        return {f"geta.{k}": str(v) for k, v in self.settings().model_dump().items()}

    @classmethod
    def distributions(cls, space: KnobSpace) -> dict[str, BaseDistribution]:
        from optuna.distributions import FloatDistribution

        if space.geta_sparsity_low < space.geta_sparsity_high:
            return {
                "geta_sparsity": FloatDistribution(
                    space.geta_sparsity_low, space.geta_sparsity_high
                )
            }
        return {}

    @classmethod
    def from_params(cls, space: KnobSpace, params: dict[str, Any]) -> GetaConfig:
        sparsity = float(params.get("geta_sparsity", space.geta_sparsity_low))
        return cls(**{**space.geta.model_dump(), "target_group_sparsity": sparsity})
