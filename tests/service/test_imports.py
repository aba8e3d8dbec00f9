"""The service never imports torch or ray at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


def test_service_modules_do_not_import_torch_or_ray() -> None:
    code = (
        "import sys\n"
        "import service.api, service.cli, service.launcher, service.store, service.spec\n"
        "import search_spaces, dashboards\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_workers_never_import_the_web_layer() -> None:
    """Statically: no workers module imports FastAPI or the service's web modules.

    (mlflow and ray.tune import FastAPI themselves; the rule is about our code.)
    """
    banned = {"fastapi", "starlette", "uvicorn", "service.api", "service.cli", "service.launcher"}
    root = Path(__file__).resolve().parents[2] / "workers"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] in banned or n in banned
            ]
    assert offenders == []
