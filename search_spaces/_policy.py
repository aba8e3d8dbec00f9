"""The compression policy: what one trial applies to a model, layer by layer.

A policy is the single description shared by the search (which samples it), the
compression engine (which applies it), MLflow (which logs it) and the exported
checkpoint (which stores it as JSON).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FLOAT_BITS = 32
Method = Literal["quant_noise", "ipq", "mx", "bfp", "geta"]
METHODS: tuple[str, ...] = ("quant_noise", "ipq", "mx", "bfp", "geta")
SparsityKind = Literal["unstructured", "2:4", "1:4"]
SPARSITY_KINDS: tuple[str, ...] = ("unstructured", "2:4", "1:4", "channel")
NM_KINDS: dict[str, tuple[int, int]] = {"2:4": (2, 4), "1:4": (1, 4)}


class LayerPolicy(BaseModel):
    """Compression of one layer's weight: sparsity first, then quantization."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(description="weight bits: 2..8, or 32 to keep the layer float")
    sparsity: float = Field(ge=0.0, lt=1.0, description="fraction of weights pruned (exact top-k)")
    kind: SparsityKind = Field(
        default="unstructured",
        description="in-layer sparsity: unstructured magnitude top-k, or N:M along the "
        "reduction dimension (then `sparsity` is 1 - N/M)",
    )

    @model_validator(mode="after")
    def _nm_fraction(self) -> LayerPolicy:
        if self.kind in NM_KINDS:
            n, m = NM_KINDS[self.kind]
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"kind {self.kind!r} prunes exactly {1 - n / m} of the weights, "
                    f"but sparsity={self.sparsity}; set sparsity to {1 - n / m}"
                )
        return self

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == FLOAT_BITS):
            raise ValueError(f"bits must be in 2..8 or {FLOAT_BITS} (float), but got {v}")
        return v


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


class Policy(BaseModel):
    """Per-layer policy plus the quantization-noise settings used while fine-tuning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: dict[str, LayerPolicy]
    noise_rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Quant-Noise p: fraction of blocks quantized"
    )
    noise_block: int = Field(default=4, ge=1, description="Quant-Noise block size (Linear/1x1)")
    # Quantization method and its knobs (workers/quant/). Defaults reproduce the
    # engine's original behaviour: per-channel symmetric int-N under Quant-Noise.
    method: Method = "quant_noise"
    granularity: Literal["channel", "tensor"] = "channel"
    symmetric: bool = True
    ipq_block: int = Field(default=4, ge=1, description="iPQ sub-vector size")
    ipq_centroids: int = Field(default=16, ge=2, le=256, description="iPQ centroids per layer")
    mx_element: Literal["int", "fp"] = Field(
        default="int", description="MX-like element type: int-N or small float (fp4/fp6/fp8)"
    )
    order: Literal["sq", "qs"] = Field(
        default="sq", description="sparsity then quantization (sq) or the reverse (qs)"
    )
    act_bits: int = Field(default=FLOAT_BITS, description="activation bits: 2..8, or 32 (float)")
    act_range: Literal["calibrated", "learned"] = "calibrated"
    geta: GetaSettings = Field(default_factory=GetaSettings)

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: int) -> int:
        if not (2 <= v <= 8 or v == FLOAT_BITS):
            raise ValueError(f"act_bits must be in 2..8 or {FLOAT_BITS} (float), but got {v}")
        return v

    channels: dict[str, float] = Field(
        default_factory=dict,
        description="structured pruning: fraction of channels removed per prunable group "
        "(keyed by the group's name, its first layer); applied before everything else",
    )

    @field_validator("channels")
    @classmethod
    def _channel_fractions(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: f for k, f in v.items() if not 0.0 <= f < 1.0}
        if bad:
            raise ValueError(f"channel fractions must lie in [0, 1), but got {bad}")
        return v

    def summary(self) -> dict[str, str]:
        """Flat string view for MLflow params (one entry per knob)."""
        out = {"noise_rate": f"{self.noise_rate:.4g}", "noise_block": str(self.noise_block)}
        out |= {"method": self.method, "act_bits": str(self.act_bits)}
        if self.method == "quant_noise":
            out |= {"granularity": self.granularity, "symmetric": str(self.symmetric)}
        if self.method == "ipq":
            out |= {"ipq_block": str(self.ipq_block), "ipq_centroids": str(self.ipq_centroids)}
        if self.method == "mx":
            out["mx_element"] = self.mx_element
        if self.method in ("mx", "bfp"):
            out["order"] = self.order
        if self.method == "geta":
            out |= {f"geta.{k}": str(v) for k, v in self.geta.model_dump().items()}
        if self.act_bits != FLOAT_BITS:
            out["act_range"] = self.act_range
        for name, lp in self.layers.items():
            out[f"{name}.bits"] = str(lp.bits)
            out[f"{name}.sparsity"] = f"{lp.sparsity:.4g}"
            if lp.kind != "unstructured":
                out[f"{name}.kind"] = lp.kind
        for group, frac in self.channels.items():
            out[f"group:{group}.channels"] = f"{frac:.4g}"
        return out
