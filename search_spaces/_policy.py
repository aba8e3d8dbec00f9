"""The compression policy: what one trial applies to a model, layer by layer.

A policy is the single description shared by the search (which samples it), the
compression engine (which applies it), MLflow (which logs it) and the exported
checkpoint (which stores it as JSON).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

FLOAT_BITS = 32


class LayerPolicy(BaseModel):
    """Compression of one layer's weight: sparsity first, then quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(description="weight bits: 2..8, or 32 to keep the layer float")
    sparsity: float = Field(ge=0.0, lt=1.0, description="fraction of weights pruned (exact top-k)")

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

    def summary(self) -> dict[str, str]:
        """Flat string view for MLflow params (one entry per knob)."""
        out = {"noise_rate": f"{self.noise_rate:.4g}", "noise_block": str(self.noise_block)}
        for name, lp in self.layers.items():
            out[f"{name}.bits"] = str(lp.bits)
            out[f"{name}.sparsity"] = f"{lp.sparsity:.4g}"
        return out
