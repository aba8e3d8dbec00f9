"""docs/compression.md's method table agrees with the registry, row by row."""

from __future__ import annotations

from pathlib import Path

from search_spaces.methods import METHODS
from workers.compress.quant import _table

DOCS = Path(__file__).parents[3] / "docs" / "compression.md"


def _documented() -> dict[str, str]:
    text = DOCS.read_text(encoding="utf-8")
    block = text.split(_table.BEGIN, 1)[1].split(_table.END, 1)[0]
    lines = [ln for ln in block.strip().splitlines() if ln.startswith("| `")]
    return {ln.split("`")[1]: ln for ln in lines}


def test_every_documented_method_is_registered_with_the_documented_properties() -> None:
    generated = {ln.split("`")[1]: ln for ln in _table.rows()}
    documented = _documented()
    assert set(documented) <= set(METHODS)
    for name, row in documented.items():
        assert row == generated[name], (
            f"regenerate: python -m workers.compress.quant._table --write ({name})"
        )


def test_the_methods_of_this_release_are_documented() -> None:
    """A method added later shows up after ``--write``; these must never drop out."""
    assert {"quant_noise", "ipq", "mx", "bfp", "geta"} <= set(_documented())
