"""``ipq``: iterative product quantization (Stock et al., 2020) trained with
Quant-Noise's PQ proxy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from search_spaces.methods._base import MethodConfig, choices, register_method

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

    from search_spaces._space import KnobSpace


@register_method
class IpqConfig(MethodConfig):
    """Sub-vector size and centroid count; per-layer bits and sparsity are ignored."""

    name: Literal["ipq"] = "ipq"
    block: int = Field(default=4, ge=1, description="iPQ sub-vector size")
    centroids: int = Field(default=16, ge=2, le=256, description="iPQ centroids per layer")

    rank: ClassVar[int] = 1
    description: ClassVar[str] = "product quantization in stages, PQ-proxy Quant-Noise"
    reports_at_rungs: ClassVar[bool] = False  # quantizes after its fine-tuning epochs
    legacy_fields: ClassVar[dict[str, str]] = {"ipq_block": "block", "ipq_centroids": "centroids"}

    def channel_multiple(self) -> int:
        return self.block  # sub-vectors tile the surviving input channels

    def summary(self) -> dict[str, str]:
        return {"ipq_block": str(self.block), "ipq_centroids": str(self.centroids)}

    @classmethod
    def distributions(cls, space: KnobSpace) -> dict[str, BaseDistribution]:
        return choices("ipq_block", space.ipq_blocks) | choices(
            "ipq_centroids", space.ipq_centroids
        )

    @classmethod
    def from_params(cls, space: KnobSpace, params: dict[str, Any]) -> IpqConfig:
        return cls(
            block=int(params.get("ipq_block", space.ipq_blocks[0])),
            centroids=int(params.get("ipq_centroids", space.ipq_centroids[0])),
        )
