"""The one rule for code a spec or a checkpoint names (workers/entrypoints.py), as the
workers apply it before they import anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from service.spec import DatasetSpec, ModelSpec
from workers import entrypoints
from workers.errors import SpecError
from workers.zoo.data import build_datasets
from workers.zoo.models import build_model


@pytest.fixture
def evilpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package that defines one model and re-exports os.system and a
    sparq function; importing it leaves a marker file."""
    pkg = tmp_path / "evilpkg"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from os import system\n"
        "from workers.zoo.models import digits_mlp as reexported\n"
        "def mlp(**kw):\n"
        "    from workers.zoo.models import digits_mlp\n"
        "    return digits_mlp(**kw)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evilpkg", None)


@pytest.mark.parametrize(
    ("entrypoint", "why"),
    [
        ("os:system", "never allowed (it is Python's standard library)"),
        ("subprocess:run", "never allowed (it is Python's standard library)"),
        ("builtins:exec", "never allowed (it is Python's standard library)"),
        ("shutil:rmtree", "never allowed (it is Python's standard library)"),
        ("workers.zoo.models:digits_mlp", "never allowed (it is sparq's own package)"),
        ("numpy:loadtxt", "not allowed (SPARQ_ENTRYPOINT_MODULES is tests)"),
        ("testsuite.x:f", "not allowed"),  # a prefix is a package, not a string prefix
    ],
)
def test_refused_whatever_the_setting_names(entrypoint: str, why: str) -> None:
    allowed = entrypoints.prefixes(["tests", "os", "workers", "builtins"])
    assert allowed == ("tests",)  # the never-allowed ones cannot be configured in
    with pytest.raises(entrypoints.NotAllowed) as e:
        entrypoints.check(entrypoint, "model.entrypoint", allowed)
    assert str(e.value).startswith(f"model.entrypoint={entrypoint!r}: module ")
    assert why in e.value.rule


def test_the_refusal_says_which_setting_allows_the_module() -> None:
    with pytest.raises(entrypoints.NotAllowed, match=r"adding 'acme\.vision'.*SPARQ_ENTRYPOINT"):
        entrypoints.check("acme.vision:net", "model.entrypoint", ())


def test_workers_check_before_importing(evilpkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(entrypoint="evilpkg:mlp")
    with pytest.raises(SpecError, match="module 'evilpkg' is not allowed"):
        build_model(spec)
    with pytest.raises(SpecError, match="module 'evilpkg' is not allowed"):
        build_datasets(DatasetSpec(entrypoint="evilpkg:data"))
    assert not evilpkg.exists()  # decided on the name: nothing was imported
    monkeypatch.setenv(entrypoints.ENV, "other, evilpkg")
    assert build_model(ModelSpec(entrypoint="evilpkg:mlp", kwargs={"hidden": 8})) is not None


def test_a_function_reexported_through_an_allowed_module_is_refused(
    evilpkg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(entrypoints.ENV, "evilpkg")
    for fn, origin in (("system", "posix"), ("reexported", "workers.zoo.models")):
        with pytest.raises(SpecError, match=f"not defined under the allowed 'evilpkg'.*{origin}"):
            build_model(ModelSpec(entrypoint=f"evilpkg:{fn}"))


def test_a_refusal_crosses_process_boundaries() -> None:
    import pickle

    e = entrypoints.NotAllowed("model.entrypoint", "os:system", "never")
    again = pickle.loads(pickle.dumps(e))
    assert (again.field, again.entrypoint, again.rule, str(again)) == (
        e.field,
        e.entrypoint,
        e.rule,
        str(e),
    )
