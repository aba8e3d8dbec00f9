"""Search spaces: the policy schema, knob objects, presets and their translation to
Optuna.

Pure Python (pydantic and PyYAML only): importable by the service without torch or ray.
"""

from search_spaces._policy import LayerPolicy, Policy
from search_spaces._presets import load_preset, merge_preset, preset_names
from search_spaces._space import (
    COARSEN_LEVELS,
    GroupInfo,
    KnobSpace,
    LayerInfo,
    knob_kinds,
    knob_layers,
    layer_kinds,
    policy_from_params,
    tie_layers,
    to_optuna,
)

__all__ = [
    "COARSEN_LEVELS",
    "GroupInfo",
    "KnobSpace",
    "LayerInfo",
    "LayerPolicy",
    "Policy",
    "knob_kinds",
    "knob_layers",
    "layer_kinds",
    "load_preset",
    "merge_preset",
    "policy_from_params",
    "preset_names",
    "tie_layers",
    "to_optuna",
]
