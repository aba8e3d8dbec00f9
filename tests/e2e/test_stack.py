"""End to end on the real stack: `sparq up` (REST on loopback, launcher, a real MLflow
server over HTTP), search drivers on a real local Ray, real training on digits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.stack import free_port, wait_http

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL = {
    "model": {"builtin": "digits-mlp", "kwargs": {"hidden": 64}},
    "dataset": {"builtin": "digits"},
    "baseline": {"epochs": 15},
    "search_space": {"finetune_epochs": 3},
    "search": {"trials": 6, "concurrency": 2, "seed": 1},
}


@dataclass
class Stack:
    api: str
    mlflow: str
    home: Path
    proc: subprocess.Popen[bytes]

    def post(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.api}/v1/jobs", json=spec, timeout=30)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{self.api}/v1/jobs/{job_id}", timeout=30).json())

    def wait(self, job_id: str, timeout: float = 400, *, synced: bool = True) -> dict[str, Any]:
        """Until the job ends and (``synced``) MLflow holds everything it wrote: the
        outcome is recorded first, MLflow's copy (model, registration, final views)
        follows through the job's outbox."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if not synced or job["mlflow"]["synced"]:
                    return job
            time.sleep(1)
        log = (self.home / "jobs" / job_id / "driver.log").read_text()[-3000:]
        raise AssertionError(f"job {job_id} did not finish in {timeout}s; driver log:\n{log}")


@contextmanager
def sparq_up(home: Path, **extra_env: str) -> Iterator[Stack]:
    """`sparq up` on free loopback ports under ``home``, in an environment without the
    caller's MLFLOW_/SPARQ_/RAY_ variables (a test may have exported some), allowing the
    suite's test models (SPARQ_ENTRYPOINT_MODULES=tests) as an operator allows theirs."""
    port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SPARQ_", "RAY_"))}
    env.update(SPARQ_HOME=str(home), PYTHONUNBUFFERED="1", SPARQ_ENTRYPOINT_MODULES="tests")
    env.update(extra_env)
    log = (home / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port),
         "--mlflow-port", str(mlflow_port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{api}/v1/health", timeout=180, proc=proc)
        yield Stack(api=api, mlflow=f"http://127.0.0.1:{mlflow_port}", home=home, proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)  # stops drivers, the Ray head and MLflow in turn
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def stack(shared_stack: Stack) -> Stack:
    return shared_stack  # tests/e2e/conftest.py


def test_job_runs_end_to_end(stack: Stack, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from workers.compress.train import evaluate, make_loader
    from workers.jobs.checkpoint import load_checkpoint
    from workers.zoo.data import digits

    job = stack.wait(stack.post(SMALL)["id"])
    assert job["status"] == "succeeded", job
    assert job["trials_completed"] + job["trials_failed"] == 6
    assert job["trials_completed"] >= 5
    base, best = job["baseline"], job["best"]
    assert base["accuracy"] > 0.9
    assert best["size_bytes"] < base["size_bytes"] / 3  # every policy quantizes to <= 8 bits
    assert best["accuracy"] >= base["accuracy"] - 0.01 - 1e-9  # the default constraint

    pareto = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/pareto").json()
    assert pareto["chosen_trial_id"] == best["trial_id"]
    assert best["trial_id"] in [p["trial_id"] for p in pareto["points"]]
    sizes = [p["size_bytes"] for p in pareto["points"]]
    accs = [p["accuracy"] for p in pareto["points"]]
    assert sizes == sorted(sizes)
    assert accs == sorted(accs)  # a front: bigger only if more accurate
    for p in pareto["points"]:
        assert set(p["policy"]["layers"]) == {"1", "3", "5"}

    # download the exported checkpoint and reload it with one call
    r = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/checkpoint")
    assert r.status_code == 200
    path = tmp_path / "best.sparq"
    path.write_bytes(r.content)
    assert path.stat().st_size == best["size_bytes"]
    ck = load_checkpoint(path)
    _, val = digits()
    import torch

    assert evaluate(
        ck.model, make_loader(val, 512, shuffle=False), torch.device("cpu")
    ).accuracy == (pytest.approx(best["accuracy"], abs=1e-12))

    # `sparq evaluate --json` prints the same numbers
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "evaluate", str(path), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    import json

    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["size_bytes"] == best["size_bytes"]
    assert printed["accuracy"] == pytest.approx(best["accuracy"], abs=1e-12)

    # MLflow holds one child run per trial under the job's parent run, over HTTP
    client = MlflowClient(tracking_uri=stack.mlflow)
    parent = job["mlflow"]["run_id"]
    children = client.search_runs(
        [job["mlflow"]["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(children) == 6
    on_front = {
        c.data.tags.get("sparq.trial_id") for c in children if c.data.tags.get("pareto") == "true"
    }
    assert on_front == {p["trial_id"] for p in pareto["points"]}
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert all("accuracy" in c.data.metrics and "size_bytes" in c.data.metrics for c in finished)
    assert all("1.bits" in c.data.params for c in finished)
    artifacts = {a.path for a in client.list_artifacts(parent, "pareto")}
    assert {"pareto/front.json", "pareto/front_table.json"} <= artifacts
    assert client.get_run(parent).data.metrics["best_size_bytes"] == best["size_bytes"]


def test_failing_trials_are_recorded_with_their_reason(stack: Stack) -> None:
    spec = {**SMALL, "model": {"entrypoint": "tests.nets:breaks_when_compressed"},
            "search_space": {"finetune_epochs": 1},
            "search": {"trials": 2, "concurrency": 2}}  # fmt: skip
    job = stack.wait(stack.post(spec)["id"])
    assert job["status"] == "failed"
    assert "all 2 trials failed" in job["error"]
    assert "refuses compressed weights" in job["error"]
    trials = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/trials").json()
    assert [t["status"] for t in trials] == ["failed", "failed"]
    assert all("refuses compressed weights" in t["error"] for t in trials)


def test_a_baseline_that_fails_to_train_fails_the_job_with_its_error(stack: Stack) -> None:
    """The search starts while the baseline trains; when the baseline fails, the job
    fails with the baseline's error, the search stops, and no trial is completed."""
    spec = {**SMALL, "model": {"entrypoint": "tests.nets:untrainable"},
            "search": {"trials": 6, "concurrency": 2}}  # fmt: skip
    job = stack.wait(stack.post(spec)["id"], timeout=240)
    assert job["status"] == "failed"
    assert "training the float baseline failed" in job["error"]
    assert "this model refuses to train" in job["error"]
    assert job["trials_completed"] == 0
    trials = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/trials").json()
    assert len(trials) < 6  # stopped, not run through
    assert all("the float baseline failed to train" in t["error"] for t in trials)


def _driver(stack: Stack, job_id: str, *, not_pid: int | None = None, timeout: float = 180) -> int:
    """The pid of the job's running driver (a new one when ``not_pid`` is given)."""
    from service.store import JobStore

    store = JobStore(f"sqlite:///{stack.home / 'sparq.db'}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.get(job_id)
        if row.status == "running" and row.driver_pid and row.driver_pid != not_pid:
            return int(row.driver_pid)
        assert row.status not in ("succeeded", "failed", "cancelled"), (row.status, row.error)
        time.sleep(0.3)
    raise AssertionError(f"no running driver for job {job_id} within {timeout}s")


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):  # wait until it is really gone (a zombie until reaped)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)


def test_a_killed_driver_is_resumed_without_rerunning_or_losing_trials(stack: Stack) -> None:
    from mlflow.tracking import MlflowClient

    spec = {**SMALL, "search_space": {"finetune_epochs": 6},
            "search": {"trials": 6, "concurrency": 2, "seed": 3}}  # fmt: skip
    job_id = stack.post(spec)["id"]
    pid = _driver(stack, job_id)
    ps = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
    assert job_id in ps.stdout  # an operator can find a job's driver with ps
    deadline = time.monotonic() + 300
    while stack.job(job_id)["trials_completed"] < 2:  # kill it mid-search
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.3)
    before = {t["trial_id"]: t for t in httpx.get(f"{stack.api}/v1/jobs/{job_id}/trials").json()}
    _kill(pid)
    new_pid = _driver(stack, job_id, not_pid=pid)
    assert (
        job_id
        in subprocess.run(
            ["ps", "-o", "args=", "-p", str(new_pid)], capture_output=True, text=True
        ).stdout
    )
    job = stack.wait(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["restarts"] == 1
    trials = httpx.get(f"{stack.api}/v1/jobs/{job_id}/trials").json()
    assert (job["trials_completed"], job["trials_failed"]) == (6, 0), [
        (t["number"], t["status"], t["error"]) for t in trials
    ]
    assert sorted(t["number"] for t in trials) == [1, 2, 3, 4, 5, 6]
    after = {t["trial_id"]: t for t in trials}
    client = MlflowClient(stack.mlflow)
    runs = client.search_runs(
        [job["mlflow"]["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{job['mlflow']['run_id']}'",
    )
    assert sorted(r.data.tags["sparq.trial_id"] for r in runs) == sorted(after)  # no duplicates
    assert all(r.info.status == "FINISHED" for r in runs)
    for trial_id, t in before.items():  # finished before the kill: kept, never trained again
        if t["status"] != "completed":
            continue
        run_id = after[trial_id]["mlflow_run_id"]
        # the same run; its id may have reached the store only after the kill (the
        # sender creates runs at most SEND_GAP_S after the trial writes them: cc6)
        assert run_id is not None
        assert t["mlflow_run_id"] in (None, run_id)
        assert after[trial_id]["accuracy"] == t["accuracy"]
        history = client.get_metric_history(run_id, "train_loss")
        assert len(history) == 6  # one per fine-tune epoch: one training only
    assert job["best"] is not None


def test_a_driver_that_keeps_dying_fails_the_job_with_the_reason(stack: Stack) -> None:
    job_id = stack.post({**SMALL, "baseline": {"epochs": 400}})["id"]
    pid = None
    for _ in range(3):  # the first run and its 2 resumptions (SPARQ_DRIVER_RESTARTS)
        pid = _driver(stack, job_id, not_pid=pid)
        _kill(pid)
    job = stack.wait(job_id, timeout=60)
    assert job["status"] == "failed"
    assert job["restarts"] == 2
    assert "exited with code -9" in job["error"]


def test_cancel_stops_a_running_search_within_seconds_and_keeps_what_finished(
    stack: Stack,
) -> None:
    spec = {**SMALL, "constraints": {"max_accuracy_drop": None},
            "search": {"trials": 40, "concurrency": 2, "seed": 5}}  # fmt: skip
    job_id = stack.post(spec)["id"]
    deadline = time.monotonic() + 300
    while stack.job(job_id)["trials_completed"] < 2:
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.3)
    asked = time.monotonic()
    r = httpx.post(f"{stack.api}/v1/jobs/{job_id}/cancel", timeout=30)
    assert r.status_code == 200, r.text
    job = stack.wait(job_id, timeout=120, synced=False)  # the outcome, not MLflow's copy
    took = time.monotonic() - asked
    assert job["status"] == "cancelled", job
    assert took < 30, f"cancel took {took:.1f} s"
    job = stack.wait(job_id, timeout=120)
    assert 2 <= job["trials_completed"] < 40
    assert job["best"] is not None  # the best of what finished was exported
    r = httpx.get(f"{stack.api}/v1/jobs/{job_id}/checkpoint", timeout=30)
    assert r.status_code == 200
    assert len(r.content) == job["best"]["size_bytes"]


def test_early_stopped_trials_are_kept_out_of_the_front_and_the_export(stack: Stack) -> None:
    from mlflow.tracking import MlflowClient

    spec = {**SMALL, "constraints": {"max_accuracy_drop": None},
            "search_space": {"finetune_epochs": 4},
            "search": {"trials": 8, "concurrency": 2, "seed": 2,
                       "early_stopping": {"enabled": True, "grace_epochs": 1,
                                          "reduction_factor": 2}}}  # fmt: skip
    job = stack.wait(stack.post(spec)["id"])
    assert job["status"] == "succeeded", job["error"]
    trials = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/trials").json()
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert stopped, "rungs of eta=2 over 8 trials stop some"
    assert job["trials_stopped"] == len(stopped)
    assert job["trials_completed"] + job["trials_stopped"] == 8
    assert all("stopped early after fine-tune epoch" in t["error"] for t in stopped)
    ids = {t["trial_id"] for t in stopped}
    pareto = httpx.get(f"{stack.api}/v1/jobs/{job['id']}/pareto").json()
    assert not ids & {p["trial_id"] for p in pareto["points"]}
    assert job["best"]["trial_id"] not in ids
    client = MlflowClient(stack.mlflow)
    for t in stopped:
        run = client.get_run(t["mlflow_run_id"])
        assert run.info.status == "KILLED"
        assert "sparq.stopped_early" in run.data.tags
