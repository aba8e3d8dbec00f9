"""Which code a spec or a checkpoint may name: one rule, used at submit (the API), on
the workers before they import a spec's entrypoint, and by the checkpoint loader.

An entrypoint ``package.module:function`` is allowed only under a module prefix the
operator listed in ``SPARQ_ENTRYPOINT_MODULES`` (comma separated, e.g.
``my_models,acme.vision``; empty by default, so only builtins run). Never allowed,
whatever the setting: Python's standard library, ``builtins`` and ``__main__``, and
sparq's own packages. The function must also be *defined* under the allowed prefix
(its ``__module__``), so an allowed module cannot re-export ``os.system``.

Imports only the standard library (and ``workers.errors``): the API checks specs
without torch.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from workers.errors import Invalid

ENV = "SPARQ_ENTRYPOINT_MODULES"
SPARQ_PACKAGES = ("service", "workers", "search_spaces", "dashboards")


class NotAllowed(Invalid):
    """An entrypoint the rule refuses: the field, the value, and the rule (which names
    the module and what would allow it). Pickles across Ray (``Invalid.__reduce__``)."""

    def __init__(self, field: str, entrypoint: str, rule: str) -> None:
        super().__init__(field, entrypoint, rule)
        self.entrypoint = entrypoint


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def never_allowed(module: str) -> str | None:
    """Why a module can never be allowed (stdlib, builtins, sparq's own), or None."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ("builtins", "__main__"):
        return "it is Python's standard library"
    if top in SPARQ_PACKAGES:
        return "it is sparq's own package"
    return None


def prefixes(names: Iterable[str]) -> tuple[str, ...]:
    """The module prefixes ``names`` allow: stripped, once each, without those that
    can never be allowed."""
    stripped = (m.strip() for m in names)
    return tuple(dict.fromkeys(m for m in stripped if m and never_allowed(m) is None))


def allowed_prefixes(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """``extra`` plus ``$SPARQ_ENTRYPOINT_MODULES`` (what this process was given)."""
    return prefixes([*extra, *os.environ.get(ENV, "").split(",")])


def check(entrypoint: str, field: str, allowed: tuple[str, ...], how: str = "") -> str:
    """The allowed prefix the entrypoint's module lies under; raises
    :class:`NotAllowed` (before anything is imported) when there is none. ``how`` says
    how to allow it (the setting, by default)."""
    module = entrypoint.partition(":")[0]
    why = never_allowed(module)
    if why:
        raise NotAllowed(field, entrypoint, f"module {module!r} is never allowed ({why})")
    for prefix in allowed:
        if _under(module, prefix):
            return prefix
    now = ",".join(allowed) or "empty"
    how = how or (
        f"the operator allows it by adding {module!r} (or a package above it) to "
        f"{ENV} on the service and its workers"
    )
    raise NotAllowed(field, entrypoint, f"module {module!r} is not allowed ({ENV} is {now}); {how}")


def load(
    entrypoint: str, field: str, allowed: tuple[str, ...], how: str = ""
) -> Callable[..., Any]:
    """Check, then import ``module:function``. Raises :class:`NotAllowed` for the rule,
    ``ImportError`` / ``AttributeError`` (with the field in the text) otherwise."""
    prefix = check(entrypoint, field, allowed, how)
    module_name, _, attr = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ImportError(
            f"{field}={entrypoint!r}: module {module_name!r} cannot be imported here "
            f"({type(e).__name__}: {e})"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AttributeError(f"{field}={entrypoint!r}: {module_name} has no callable {attr!r}")
    origin = getattr(fn, "__module__", None)
    if not isinstance(origin, str) or not _under(origin, prefix):
        raise NotAllowed(
            field,
            entrypoint,
            f"{attr!r} is not defined under the allowed {prefix!r} (it comes from {origin!r})",
        )
    return fn
