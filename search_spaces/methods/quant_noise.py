"""``quant_noise``: int-N Quant-Noise (Fan et al., 2020), per channel or per tensor,
symmetric or affine; the default method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from search_spaces.methods._base import MethodConfig, choices, register_method

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from search_spaces._space import KnobSpace


@register_method
class QuantNoiseConfig(MethodConfig):
    """Per-layer bits and sparsity from the policy's layers; noise rate and block from
    the policy."""

    name: Literal["quant_noise"] = "quant_noise"
    granularity: Literal["channel", "tensor"] = "channel"
    symmetric: bool = True
    order: Literal["sq", "qs"] = "sq"

    rank: ClassVar[int] = 0
    description: ClassVar[str] = "int-N under Quant-Noise, per channel or tensor, (a)symmetric"
    export_formats: ClassVar[frozenset[str]] = frozenset({"sparq", "onnx"})
    legacy_fields: ClassVar[dict[str, str]] = {
        "granularity": "granularity",
        "symmetric": "symmetric",
        "order": "order",
    }

    def summary(self) -> dict[str, str]:
        return {"granularity": self.granularity, "symmetric": str(self.symmetric)}

    @classmethod
    def distributions(cls, space: KnobSpace) -> dict[str, BaseDistribution]:
        return choices("granularity", space.granularities) | choices("symmetric", space.symmetric)

    @classmethod
    def from_params(cls, space: KnobSpace, params: dict[str, Any]) -> QuantNoiseConfig:
        return cls(
            granularity=params.get("granularity", space.granularities[0]),
            symmetric=bool(params.get("symmetric", space.symmetric[0])),
            order=space.order,
        )
