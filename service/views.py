"""Terminal views of a job for ``sparq status`` and ``sparq watch``: a progress bar
and the front as a rich table, built from the REST API's job and pareto views.

The point the export rule would pick is marked while the search runs (``dashboards.
export_choice`` with the job's task, rule and constraints, the same call the driver
makes), and the exported point once the job has ended.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from dashboards import export_choice

TERMINAL = {"succeeded", "failed", "cancelled"}


def current_choice(job: dict[str, Any], pareto: dict[str, Any]) -> str | None:
    """The exported trial once the job has one, else the one the rule picks now."""
    if pareto.get("chosen_trial_id"):
        return str(pareto["chosen_trial_id"])
    base = pareto.get("baseline")
    if not base or not pareto["points"]:
        return None
    spec = job.get("spec") or {}
    constraints = spec.get("constraints") or {}
    best = export_choice(
        str(spec.get("task", "classification")),
        pareto["points"],
        baseline=base,
        baseline_size_bytes=base["size_bytes"],
        rule=(spec.get("export") or {}).get("choose", "knee"),
        max_accuracy_drop=constraints.get("max_accuracy_drop"),
        max_size_bytes=constraints.get("max_size_bytes"),
    )
    return best.trial_id if best else None


def front_table(pareto: dict[str, Any], chosen: str | None = None) -> Table:
    """The front, smallest first; ``*`` marks ``chosen``."""
    base = pareto.get("baseline") or {}
    chosen = chosen if chosen is not None else pareto.get("chosen_trial_id")
    hv = pareto.get("hypervolume")
    title = f"Pareto front ({len(pareto['points'])} points"
    title += f", hypervolume {hv:.4f})" if hv is not None else ")"
    table = Table(title=title)
    # a task whose front ranks by another axis than its `accuracy` column (language
    # modelling: exp(-loss)) shows that axis too; distillation's is its cosine itself
    label = pareto.get("quality_label", "accuracy")
    shown = pareto.get("accuracy_label", "accuracy")
    points = pareto["points"]
    extra = [label] if any(p.get("quality", p["accuracy"]) != p["accuracy"] for p in points) else []
    for col in ("trial", shown, *extra, "Δ vs float", "size (bytes)", "compression", "bits"):
        table.add_column(col, justify="right")
    for p in pareto["points"]:
        bits = sorted({lp["bits"] for lp in p["policy"].get("layers", {}).values()})
        q = p.get("quality")
        quality = [f"{q:.4f}" if q is not None else "-"] if extra else []
        # the drop the constraint measures: on the front's axis where both are known
        key = (
            "quality" if extra and q is not None and base.get("quality") is not None else "accuracy"
        )
        table.add_row(
            p["trial_id"] + (" *" if p["trial_id"] == chosen else ""),
            f"{p['accuracy']:.4f}",
            *quality,
            f"{p[key] - base.get(key, 0):+.4f}",
            f"{p['size_bytes']:,}",
            f"{p['compression']:.1f}x",
            ",".join(map(str, bits)),
        )
    if base:
        table.caption = (
            f"float baseline: {shown} {base['accuracy']:.4f}, {base['size_bytes']:,} bytes"
            + ("; * exported" if pareto.get("chosen_trial_id") else "; * the rule's pick now")
        )
    return table


def _elapsed(job: dict[str, Any]) -> str:
    start = job.get("started_at")
    if not start:
        return "not started"
    t0 = datetime.fromisoformat(str(start))
    end = job.get("finished_at")
    t1 = datetime.fromisoformat(str(end)) if end else datetime.now(UTC)
    if t0.tzinfo is None:  # the store keeps UTC without an offset
        t0 = t0.replace(tzinfo=UTC)
    if t1.tzinfo is None:
        t1 = t1.replace(tzinfo=UTC)
    s = max(0, int((t1 - t0).total_seconds()))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def job_view(job: dict[str, Any], pareto: dict[str, Any] | None) -> RenderableType:
    """Progress bar (finished of total trials, status, front size, hypervolume,
    elapsed) above the front table."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[elapsed]}"),
    )
    desc = f"job {job['id']} [{job['status']}] front {job['front_size']}"
    if job.get("hypervolume") is not None:
        desc += f" hv {job['hypervolume']:.4f}"
    if job["trials_failed"]:
        desc += f" ({job['trials_failed']} failed)"
    if job.get("trials_stopped"):
        desc += f" ({job['trials_stopped']} stopped early)"
    progress.add_task(
        escape(desc),  # "[running]" is not a style
        total=job["trials_total"],
        completed=job["trials_completed"] + job["trials_failed"] + job.get("trials_stopped", 0),
        elapsed=_elapsed(job),
    )
    parts: list[RenderableType] = [progress]
    if pareto is not None and pareto["points"]:
        parts.append(front_table(pareto, current_choice(job, pareto)))
    elif job["status"] not in TERMINAL:
        parts.append(Text("waiting for the first trial to finish...", style="dim"))
    for key in ("message", "error"):
        if job.get(key):
            parts.append(Text(f"{key}: {job[key]}", style="red" if key == "error" else ""))
    return Group(*parts)


def snapshot(client: Any, job_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    job = client.job(job_id)
    pareto = client.pareto(job_id) if job["trials_completed"] else None
    return job, pareto


def watch(client: Any, job_id: str, console: Console, *, poll_s: float = 1.0) -> dict[str, Any]:
    """Redraw the view in place until the job ends; returns the final job."""
    job, pareto = snapshot(client, job_id)
    with Live(job_view(job, pareto), console=console, refresh_per_second=4) as live:
        while job["status"] not in TERMINAL:
            time.sleep(poll_s)
            job, pareto = snapshot(client, job_id)
            live.update(job_view(job, pareto))
    if not console.is_terminal:  # Live leaves the cursor after its last frame there
        console.line()
    return job
