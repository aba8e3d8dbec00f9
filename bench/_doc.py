"""Helpers shared by the quantization benchmarks: the machine line and rewriting one
section of a markdown file while keeping the others."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), CPU only, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"
    )


def record_section(doc: Path, section: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace ``section`` (a ``## `` heading line) and its text up to the next ``## ``
    heading in ``doc`` with ``body`` (which starts with the heading); append if absent."""
    old = doc.read_text() if doc.exists() else title + "\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    else:
        end = old.find("\n## ", start + len(section))
        tail = old[end + 1 :] if end >= 0 else ""
        new = old[:start] + body.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    doc.write_text(new)
