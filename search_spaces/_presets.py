"""Search-space presets: partial ``search_space`` mappings shipped as YAML files in
``search_spaces/presets/`` (package data, read with :mod:`importlib.resources`).

A job spec's ``search_space.preset`` names one; its values are applied first and every
knob the job writes overrides them knob by knob (:func:`merge_preset`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

# Nested mappings merged key by key; every other knob (lists, ranges, scalars) is
# replaced whole by the job's value.
MERGED_KNOBS: tuple[str, ...] = ("ipq", "activation", "geta", "method_knobs")


def _dir() -> Any:
    return resources.files("search_spaces").joinpath("presets")


@functools.cache
def preset_names() -> tuple[str, ...]:
    """The shipped presets, sorted."""
    return tuple(
        sorted(p.name.removesuffix(".yaml") for p in _dir().iterdir() if p.name.endswith(".yaml"))
    )


@functools.cache
def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load(_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"preset {name!r} must be a mapping, but its YAML holds {type(data)}")
    return data


def load_preset(name: str) -> dict[str, Any]:
    """A preset's partial ``search_space`` mapping (a fresh copy)."""
    if name not in preset_names():
        raise ValueError(f"preset {name!r} is not known; choose one of {list(preset_names())}")
    return copy.deepcopy(_load(name))


def merge_preset(preset: Mapping[str, Any], knobs: Mapping[str, Any]) -> dict[str, Any]:
    """The preset's values overridden by the job's ``knobs``, knob by knob: nested
    mappings in :data:`MERGED_KNOBS` merge key by key, everything else is replaced."""
    out = dict(preset)
    for key, value in knobs.items():
        base = out.get(key)
        if key in MERGED_KNOBS and isinstance(base, Mapping) and isinstance(value, Mapping):
            out[key] = {**base, **value}
        else:
            out[key] = value
    return out
