"""The driver's decisions that need no cluster: where a trial can run, whether the
Ray cluster it joined is gone, and the MLflow names of a job."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from service.settings import _PRINCIPAL
from service.spec import JobSpec
from workers.search.driver import check_fits, mlflow_names, ray_lost

MINIMAL_SPEC = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}
TWO_NODES = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 1.0, "memory": 1e9}]


def test_a_trial_that_fits_one_node_is_accepted() -> None:
    check_fits(2, 0, TWO_NODES)
    with pytest.raises(ValueError, match=r"resources\.cpus=2.5 fits no node"):
        check_fits(2.5, 0, TWO_NODES)
    with pytest.raises(ValueError, match=r"resources\.cpus=3 fits"):
        check_fits(3.0, 0, TWO_NODES)  # as the spec holds it: a float


def test_cpus_above_every_node_fail_at_once_naming_request_and_largest_node() -> None:
    # 3 CPUs exist in all, but a trial runs on one node: it could never be scheduled
    with pytest.raises(ValueError, match=r"resources\.cpus=3 fits no node.*largest has 2 CPUs"):
        check_fits(3, 0, TWO_NODES)


def test_a_gpu_request_on_a_cluster_without_gpus_fails_at_once() -> None:
    with pytest.raises(
        ValueError, match=r"resources\.gpus=1 but the Ray cluster \(2 nodes\) has no GPUs"
    ):
        check_fits(1, 1, TWO_NODES)


def test_gpus_above_every_node_fail() -> None:
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(ValueError, match=r"resources\.gpus=2 fits no node.*largest has 1 GPUs"):
        check_fits(1, 2, nodes)
    check_fits(1, 0.25, nodes)  # a fraction of a GPU fits


def test_ray_lost_tells_a_listening_address_from_a_dead_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not ray_lost(f"127.0.0.1:{s.getsockname()[1]}")
        port = s.getsockname()[1]
    assert ray_lost(f"127.0.0.1:{port}", timeout=1)
    assert not ray_lost(None)  # a driver with a Ray of its own


def test_a_resumed_search_runs_only_what_the_job_store_lacks() -> None:
    from datetime import timedelta

    from service import store as st
    from service.spec import JobSpec
    from workers.search.driver import Remaining

    spec = JobSpec.model_validate(
        {
            "name": "r",
            "model": {"builtin": "digits-mlp"},
            "dataset": {"builtin": "digits"},
            "search": {"trials": 6, "time_budget_s": 600},
        }
    )
    job = st.Job(started_at=st.utcnow() - timedelta(seconds=100))
    kept = [st.Trial(trial_id=i, number=n) for i, n in (("a", 1), ("b", 3), ("c", 4))]
    left = Remaining.of(job, kept, spec)
    assert (left.trials, left.taken) == (3, frozenset({1, 3, 4}))
    assert 499 <= left.time_budget_s <= 500.5
    naive = st.Job(started_at=(st.utcnow() - timedelta(seconds=700)).replace(tzinfo=None))
    assert Remaining.of(naive, kept, spec).trials == 0  # the budget is spent: none more
    assert Remaining.of(st.Job(), [], spec) == Remaining(6, frozenset(), 600)


def test_mlflow_names_include_the_owner_and_never_collide_across_owners() -> None:
    assert mlflow_names(None, "digits") == ("sparq/digits", "sparq-digits")  # as always
    assert mlflow_names("alice", "digits") == ("sparq/alice/digits", "sparq-alice~digits")
    # owners and names may hold '-': with '-' between them these two would share a model
    pairs = [("ml", "team-x"), ("ml-team", "x"), (None, "ml-team-x"), (None, "ml")]
    experiments, models = zip(*(mlflow_names(o, n) for o, n in pairs), strict=True)
    assert len(set(experiments)) == len(set(models)) == len(pairs)
    # which holds since neither a principal nor a job name can hold '~' or '/'
    for bad in ("ml~team", "ml/team"):
        assert not _PRINCIPAL.fullmatch(bad)
        with pytest.raises(ValidationError, match="name"):
            JobSpec.model_validate({**MINIMAL_SPEC, "name": bad})
