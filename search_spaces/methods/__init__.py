"""The compression methods' configs, one module per method, found without a hand list.

Every public module of this package is imported once (``pkgutil``); each registers its
config class with :func:`register_method`. Adding a method is adding its module here,
its handler module in ``workers/compress/quant/`` and a preset in ``search_spaces/presets/``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from search_spaces.methods._base import (
    FLOAT_BITS,
    FORMATS,
    MethodConfig,
    choices,
    register_method,
    registered,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

METHODS: dict[str, type[MethodConfig]] = registered()


def method_class(name: str) -> type[MethodConfig]:
    """The config class of a method name (``ValueError`` naming the known ones)."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not known; choose one of {list(METHODS)}")
    return METHODS[name]


def check_method_knobs(method_knobs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every key a registered method, every value valid for its ``Knobs`` (pydantic's
    error names the field); returned as given."""
    unknown = sorted(set(method_knobs) - set(METHODS))
    if unknown:
        raise ValueError(f"method_knobs names methods {unknown}; choose from {list(METHODS)}")
    for name, knobs in method_knobs.items():
        try:
            METHODS[name].Knobs.model_validate(knobs)
        except ValidationError as e:  # the method's name in each error's path
            errors = [
                InitErrorDetails(
                    type=PydanticCustomError("method_knobs", str(err["msg"])),
                    loc=(name, *err["loc"]),
                    input=err["input"],
                )
                for err in e.errors()
            ]
            raise ValidationError.from_exception_data("method_knobs", errors) from None
    return method_knobs


__all__ = [
    "FLOAT_BITS",
    "FORMATS",
    "METHODS",
    "MethodConfig",
    "check_method_knobs",
    "choices",
    "method_class",
    "register_method",
]
