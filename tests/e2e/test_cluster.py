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


ENDED = ("FINISHED", "FAILED", "KILLED")


def running_on(outbox: Path, node_id: str) -> list[str]:
    """Trials whose latest attempt runs on the node and has not ended."""
    out = []
    for p in outbox.glob("trial-*.jsonl"):
        text = p.read_text()
        here = text.rfind(f'"sparq.node_id":"{node_id}"')
        if here >= 0 and not any(f'"status":"{s}"' in text[here:] for s in ENDED):
            out.append(p.stem)
    return out


def trials(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{stack.api}/v1/jobs/{job_id}/trials", timeout=30).json())


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayCluster, Stack]]:
    """A head of 2 CPUs and a worker node of 1, and a stack on them: the spreading and
    placement tests run their jobs first, then the node-kill test kills the worker (it
    must come last: the tests run in file order, and nothing after it uses this
    cluster). One cluster and one `sparq up` for the module: about 25 s each."""
    with on_cluster(tmp_path_factory.mktemp("two-nodes") / "home", 2, [1]) as both:
        yield both


def test_trials_run_on_every_node_of_the_cluster(two_nodes: tuple[RayCluster, Stack]) -> None:
    from service.store import JobStore

    # 4 trials, three at once, each longer (~20 s) than a node's first trial worker takes
    # to start. The node that trained the baseline has a warm worker for its trial
    # actor; the other node's first worker imports torch, Tune and MLflow on two loaded
    # cores. Tune reuses actors (reuse_actors=True); our reading of the runs: a trial
    # that waits for a starting actor is given the first actor that frees, so with ~7 s
    # trials every trial of a fresh clone's run went to one node (the head in one run,
    # the worker in another).
    # Random suggestions: no GP fit between trials.
    spec = {**SMALL, "resources": {"cpus": 1}, "search_space": {"finetune_epochs": 120},
            "search": {**SMALL["search"], "trials": 4, "concurrency": 3,
                       "sampler": "random"}}  # fmt: skip
    cluster, stack = two_nodes
    job = stack.wait(stack.post(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["trials_completed"] == 4
    done = trials(stack, job["id"])
    nodes = {t["node_id"] for t in done}
    # three trials at once of one CPU each on 2 + 1 CPUs: both nodes run trials
    assert nodes == {cluster.head.node_id, cluster.workers[0].node_id}, done
    # Tune's trial checkpoints are where the driver reads them (the job dir;
    # shared by both nodes here because they are on one machine)
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
    two_nodes: tuple[RayCluster, Stack],
) -> None:
    """Head 2 CPUs, worker 1: trials that need 2 CPUs can only run on the head."""
    spec = {**SMALL, "resources": {"cpus": 2}, "search_space": {"finetune_epochs": 2},
            "search": {"trials": 3, "concurrency": 2, "seed": 1}}  # fmt: skip
    cluster, stack = two_nodes
    job = stack.wait(stack.post(spec)["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    done = trials(stack, job["id"])
    assert len(done) == 3
    assert {t["node_id"] for t in done} == {cluster.head.node_id}, done
    # 3 CPUs exist in all, but no node has 3: refused at once, never a wait forever
    started = time.monotonic()
    job = stack.wait(stack.post({**spec, "resources": {"cpus": 3}})["id"], timeout=120)
    assert job["status"] == "failed"
    assert "resources.cpus=3 fits no node" in job["error"]
    assert "largest has 2 CPUs" in job["error"]
    assert time.monotonic() - started < 60


def test_a_worker_node_killed_mid_job_has_its_trials_retried_elsewhere(
    two_nodes: tuple[RayCluster, Stack],
) -> None:
    from service.store import JobStore

    # 4 trials of about 20 s, three at once, as in the first test: 3 s trials all ran
    # on the head while the worker's first trial actor started (a clean clone's run),
    # so no trial ran on the worker to be killed
    spec = {**SMALL, "resources": {"cpus": 1}, "search_space": {"finetune_epochs": 120},
            "search": {"trials": 4, "concurrency": 3, "seed": 4, "sampler": "random"}}  # fmt: skip
    cluster, stack = two_nodes
    worker = cluster.workers[0]
    job_id = stack.post(spec)["id"]
    deadline = time.monotonic() + 240
    outbox = stack.home / "jobs" / job_id / "outbox"
    # kill the worker while a trial runs on it: the trial's outbox stream names
    # the node of each attempt and has no final status yet
    while not running_on(outbox, worker.node_id):
        assert time.monotonic() < deadline, "no trial ran on the worker node"
        time.sleep(0.2)
    killed_at = datetime.now(UTC)
    worker.kill()
    job = stack.wait(job_id, timeout=300)
    store = JobStore(f"sqlite:///{stack.home / 'sparq.db'}")
    rows = store.trials(job_id)
    store.close()
    summary = [(t.number, t.status, (t.node_id or "")[:8], t.error) for t in rows]
    assert job["status"] == "succeeded", (job["error"], summary)
    assert (job["trials_completed"], job["trials_failed"]) == (4, 0), summary
    assert {t.node_id for t in rows} <= {cluster.head.node_id, worker.node_id}
    late = killed_at + timedelta(seconds=2)
    for t in rows:
        if t.node_id == worker.node_id:  # finished before the node went down
            assert t.finished_at is not None
            assert t.finished_at.replace(tzinfo=UTC) < late, summary
    assert sum(t.node_id == cluster.head.node_id for t in rows) >= 3, summary
    # the trial the dead node was running ran again (its outbox stream says RUNNING
    # once per attempt) and completed on the head
    attempts = {
        p.stem: p.read_text().count('"status":"RUNNING"') for p in outbox.glob("trial-*.jsonl")
    }
    assert max(attempts.values()) >= 2, attempts
