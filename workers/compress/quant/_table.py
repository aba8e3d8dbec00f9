"""docs/compression.md's method table, generated from the registry: the configs
(``search_spaces.methods``) and their handlers (``workers.compress.quant``).

``python -m workers.compress.quant._table`` prints it; ``--write`` replaces the table between
the markers in docs/compression.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from search_spaces.methods import METHODS, MethodConfig
from workers.compress.quant import HANDLERS

BEGIN, END = "<!-- methods:begin -->", "<!-- methods:end -->"
HEADER = (
    "| method | what | knobs (`Policy.method`) | rungs | channel multiple | encodings | formats |",
    "|---|---|---|---|---|---|---|",
)


def rows() -> list[str]:
    """One row per registered method, in registry order."""
    out = []
    for name, cls in METHODS.items():
        knobs = ", ".join(f"`{k}`" for k in cls.model_fields if k != "name") or "none"
        own = cls.channel_multiple is not MethodConfig.channel_multiple
        multiple = (
            f"its knobs' (default {cls.model_validate({}).channel_multiple()})" if own else "1"
        )
        handler = HANDLERS[cls]
        encodings = ", ".join(f"`{e}`" for e in (*handler.encodings, *handler.also_writes))
        rungs = "yes" if cls.reports_at_rungs else "no (reports once)"
        formats = ", ".join(
            f"`{f}`" for f in sorted(cls.export_formats, key=("sparq", "onnx").index)
        )
        out.append(
            f"| `{name}` | {cls.description} | {knobs} | {rungs} | {multiple} | {encodings} "
            f"| {formats} |"
        )
    return out


def table() -> str:
    return "\n".join((*HEADER, *rows()))


def write(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write(Path(__file__).parents[3] / "docs" / "compression.md")
    else:
        sys.stdout.write(table() + "\n")
