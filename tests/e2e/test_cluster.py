"""sparq on a real multi-node Ray cluster: `ray start --head` and `ray start --address`
worker nodes (tests/e2e/cluster.py), then `sparq up` pointed at it through
SPARQ_RAY_ADDRESS and RAY_AUTH_* exactly as an operator would, so it starts no Ray of
its own and every job's driver joins the cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.cluster import RayCluster, ray_cluster
from tests.e2e.test_stack import SMALL, Stack, sparq_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@contextmanager
def on_cluster(
    home: Path, head_cpus: int, worker_cpus: list[int]
) -> Iterator[tuple[RayCluster, Stack]]:
    home.mkdir(parents=True, exist_ok=True)
    with (
        ray_cluster(head_cpus, worker_cpus) as cluster,
        sparq_up(home, SPARQ_RAY_ADDRESS=cluster.address, **cluster.env) as stack,
    ):
        yield cluster, stack
        up_log = (home / "up.log").read_text()
        assert "starting a local Ray head" not in up_log  # SPARQ_RAY_ADDRESS is the cluster
        assert f"Ray         {cluster.address}" in up_log


def trials(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{stack.api}/v1/jobs/{job_id}/trials", timeout=30).json())


@pytest.fixture(scope="module")
def cluster_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RayCluster, Stack]]:
    """One cluster for the module, as a small deployment: a head with 1 CPU and a
    worker node with 2. The worker is killed by the last test."""
    with on_cluster(tmp_path_factory.mktemp("cluster") / "home", 1, [2]) as both:
        yield both


def test_trials_run_on_every_node_of_the_cluster(
    cluster_stack: tuple[RayCluster, Stack],
) -> None:
    from service.store import JobStore

    cluster, stack = cluster_stack
    # three trials at once on the three CPUs of the cluster: both nodes run trials.
    # Trials of a second or two, suggested at once (random search): with trials far
    # shorter than a GP suggestion, one reused actor on one node did them all.
    spec = {**SMALL, "resources": {"cpus": 1}, "search_space": {"finetune_epochs": 20},
            "search": {"trials": 6, "concurrency": 3, "seed": 1, "sampler": "random"}}  # fmt: skip
    job = stack.wait(stack.post(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["trials_completed"] == 6
    done = trials(stack, job["id"])
    nodes = {t["node_id"] for t in done}
    assert nodes == {cluster.head.node_id, cluster.workers[0].node_id}, done
    # trial checkpoints are where the driver reads them (the job dir; shared by both
    # nodes here because they are on one machine)
    job_dir = stack.home / "jobs" / job["id"]
    store = JobStore(f"sqlite:///{stack.home / 'sparq.db'}")
    for t in store.trials(job["id"]):
        assert t.checkpoint
        assert Path(t.checkpoint).is_file()
        assert Path(t.checkpoint).is_relative_to(job_dir)
    store.close()
    assert (job_dir / "best.sparq").stat().st_size == job["best"]["size_bytes"]
    # no node but the two of the cluster was ever started
    assert {n["id"] for n in cluster.nodes()} == nodes


def test_trials_are_placed_on_the_nodes_their_cpus_fit(
    cluster_stack: tuple[RayCluster, Stack],
) -> None:
    """Head 1 CPU, worker 2: trials that need 2 CPUs can only run on the worker; 3
    CPUs exist in all but on no node, so a job asking 3 is refused at once."""
    cluster, stack = cluster_stack
    spec = {**SMALL, "resources": {"cpus": 2}, "search_space": {"finetune_epochs": 2},
            "search": {"trials": 3, "concurrency": 2, "seed": 1}}  # fmt: skip
    job = stack.wait(stack.post(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    done = trials(stack, job["id"])
    assert len(done) == 3
    assert {t["node_id"] for t in done} == {cluster.workers[0].node_id}, done
    started = time.monotonic()
    job = stack.wait(stack.post({**spec, "resources": {"cpus": 3}})["id"], timeout=120)
    assert job["status"] == "failed"
    assert "resources.cpus=3 fits no node" in job["error"]
    assert "largest has 2 CPUs" in job["error"]
    assert time.monotonic() - started < 60


def test_a_worker_node_killed_mid_job_has_its_trials_retried_elsewhere(
    cluster_stack: tuple[RayCluster, Stack],
) -> None:
    """Last in the module: it kills the worker node."""
    from service.store import JobStore

    cluster, stack = cluster_stack
    spec = {**SMALL, "resources": {"cpus": 1}, "search_space": {"finetune_epochs": 5},
            "search": {"trials": 6, "concurrency": 3, "seed": 4}}  # fmt: skip
    worker = cluster.workers[0]
    job_id = stack.post(spec)["id"]
    deadline = time.monotonic() + 240
    while stack.job(job_id)["trials_completed"] < 1:  # the search is under way
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.3)
    time.sleep(1.5)  # the next trials have started, on both nodes
    killed_at = datetime.now(UTC)
    worker.kill()
    job = stack.wait(job_id, timeout=300)
    store = JobStore(f"sqlite:///{stack.home / 'sparq.db'}")
    rows = store.trials(job_id)
    store.close()
    summary = [(t.number, t.status, (t.node_id or "")[:8], t.error) for t in rows]
    assert job["status"] == "succeeded", (job["error"], summary)
    assert (job["trials_completed"], job["trials_failed"]) == (6, 0), summary
    assert {t.node_id for t in rows} <= {cluster.head.node_id, worker.node_id}
    late = killed_at + timedelta(seconds=2)
    for t in rows:
        if t.node_id == worker.node_id:  # finished before the node went down
            assert t.finished_at is not None
            assert t.finished_at.replace(tzinfo=UTC) < late, summary
    assert sum(t.node_id == cluster.head.node_id for t in rows) >= 3, summary
