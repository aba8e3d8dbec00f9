"""``mx``: an MX-like format (OCP Microscaling): blocks of 32 weights sharing one
power-of-two exponent, int-N or small-float elements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from search_spaces.methods._base import MethodConfig, choices, register_method

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from search_spaces._space import KnobSpace


@register_method
class MxConfig(MethodConfig):
    name: Literal["mx"] = "mx"
    element: Literal["int", "fp"] = Field(
        default="int", description="element type: int-N or small float (fp4/fp6/fp8)"
    )
    order: Literal["sq", "qs"] = "sq"

    rank: ClassVar[int] = 2
    description: ClassVar[str] = "MX-like shared-exponent blocks, int or fp elements"
    legacy_fields: ClassVar[dict[str, str]] = {"mx_element": "element", "order": "order"}

    def summary(self) -> dict[str, str]:
        return {"mx_element": self.element, "order": self.order}

    @classmethod
    def distributions(cls, space: KnobSpace) -> dict[str, BaseDistribution]:
        return choices("mx_element", space.mx_elements)

    @classmethod
    def from_params(cls, space: KnobSpace, params: dict[str, Any]) -> MxConfig:
        return cls(
            element=params.get("mx_element", space.mx_elements[0]),
            order=space.order,
        )
