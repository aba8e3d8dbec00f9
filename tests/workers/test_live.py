"""Live views against a real MLflow tracking store: snapshots coalesce, the last one
is always drawn, and what lands on the run is the newest state."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dashboards import PlotPoint
from workers.search import outbox, tracking
from workers.search.live import ARTIFACT_DIR, LiveViews, Snapshot, priority, renderer_process

pytestmark = pytest.mark.slow  # renders plots and starts an MLflow store


def _snap(n: int, title: str) -> Snapshot:
    rng = random.Random(n)
    pts: list[PlotPoint | None] = [
        PlotPoint(
            f"t{i}",
            rng.randint(70, 99) / 100,
            rng.randint(2, 40) * 100,
            {"layers": {"1": {"bits": rng.choice([2, 4, 8]), "sparsity": 0.3}}},
        )
        for i in range(n)
    ]
    pts.insert(1, None)  # a failed trial
    return Snapshot(pts, 0.97, 10_000, "t0", title)


def _parent_run(tmp_path: Path) -> tuple[Any, str, tracking.Recorder, Callable[[], int]]:
    """A job's parent run, through the outbox, in a real (SQLite) MLflow store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    c.create_experiment("live", artifact_location=(tmp_path / "artifacts").as_uri())
    rec = tracking.Recorder(tmp_path / "outbox", outbox.DRIVER_STREAM)
    rec.experiment("live")
    rec.run(tracking.PARENT, "job", {})
    sender = tracking.MlflowSender(tmp_path / "outbox", uri)
    sender.send_available()
    return (
        c,
        outbox.State.load(tmp_path / "outbox").ids[tracking.PARENT],
        rec,
        sender.send_available,
    )


def test_snapshots_coalesce_and_the_last_one_is_published(tmp_path: Path) -> None:
    c, run_id, rec, send = _parent_run(tmp_path)
    views = LiveViews(rec, tmp_path / "views", min_interval_s=60.0)
    for n in range(2, 8):  # arrives much faster than the interval: only first and last drawn
        views.submit(_snap(n, f"snapshot {n}"))
    views.close()
    send()
    assert views.submitted == 6
    assert 1 <= views.published <= 2
    names = {a.path for a in c.list_artifacts(run_id, ARTIFACT_DIR)}
    assert {
        f"{ARTIFACT_DIR}/{f}" for f in ("front.png", "front.html", "hypervolume.png", "policy.png")
    } <= names
    html = Path(
        c.download_artifacts(run_id, f"{ARTIFACT_DIR}/front.html", str(tmp_path))
    ).read_text()
    assert "snapshot 7" in html
    with pytest.raises(RuntimeError, match="after close"):
        views.submit(_snap(2, "late"))


def test_the_final_snapshot_replaces_the_pending_one(tmp_path: Path) -> None:
    """The driver ends the views with the final snapshot (the exported point marked):
    it is drawn at once, even within the interval, instead of what was pending."""
    c, run_id, rec, send = _parent_run(tmp_path)
    views = LiveViews(rec, tmp_path / "views", min_interval_s=60.0)
    views.submit(_snap(3, "snapshot 3"))
    deadline = time.monotonic() + 60
    while views.published < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    views.submit(_snap(4, "snapshot 4"))  # within the interval: pending
    views.end(_snap(5, "final snapshot"))
    views.close()
    send()
    assert (views.submitted, views.published) == (3, 2)
    html = Path(
        c.download_artifacts(run_id, f"{ARTIFACT_DIR}/front.html", str(tmp_path))
    ).read_text()
    assert "final snapshot" in html
    assert "snapshot 4" not in html


def test_the_renderer_is_another_process_at_the_lowest_priority() -> None:
    with renderer_process() as r:
        assert r.submit(os.getpid).result() != os.getpid()
        nice, group = r.submit(priority).result()
        assert nice == 19
        if group is not None:  # autogroups: its own session's group, at nice 19 too
            assert group.endswith("nice 19")
            assert group != Path("/proc/self/autogroup").read_text().strip()
