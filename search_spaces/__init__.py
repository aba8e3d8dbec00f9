"""Search spaces: the policy schema, knob objects and their translation to Optuna.

Pure Python (pydantic only): importable by the service without torch or ray.
"""

from search_spaces._policy import LayerPolicy, Policy
from search_spaces._space import (
    GroupInfo,
    KnobSpace,
    LayerInfo,
    layer_kinds,
    policy_from_params,
    to_optuna,
)

__all__ = [
    "GroupInfo",
    "KnobSpace",
    "LayerInfo",
    "LayerPolicy",
    "Policy",
    "layer_kinds",
    "policy_from_params",
    "to_optuna",
]
