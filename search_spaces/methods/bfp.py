"""``bfp``: block floating point, blocks of 64 weights sharing one exponent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from search_spaces.methods._base import MethodConfig, register_method

if TYPE_CHECKING:
    from search_spaces._space import KnobSpace


@register_method
class BfpConfig(MethodConfig):
    name: Literal["bfp"] = "bfp"
    order: Literal["sq", "qs"] = "sq"

    rank: ClassVar[int] = 3
    description: ClassVar[str] = "block floating point, blocks of 64, int-N mantissas"
    legacy_fields: ClassVar[dict[str, str]] = {"order": "order"}

    def summary(self) -> dict[str, str]:
        return {"order": self.order}

    @classmethod
    def from_params(cls, space: KnobSpace, params: dict[str, Any]) -> BfpConfig:
        return cls(order=space.order)
