"""Never lose a job, on the real stack: the MLflow server killed mid-job and started
again 45 s later on the same store; the whole stack (`sparq up`: API, launcher,
MLflow server, Ray head) killed with kill -9 mid-job and started again on the same
SPARQ_HOME and ports; the API alone killed while drivers run on an external Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import store as st
from service.stack import free_port, start_mlflow, wait_http
from tests.e2e.test_stack import SMALL, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = {
    **SMALL,
    "search_space": {"finetune_epochs": 3},
    "search": {"trials": 8, "concurrency": 2, "seed": 11},
}


class Up:
    """`sparq up` as an operator runs it: fixed ports, so it can be started again."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home, self.port, self.mlflow_port = home, free_port(), free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SPARQ_"))}
        base = {k: v for k, v in base.items() if not k.startswith("RAY_")}
        self.env = {**base, "SPARQ_HOME": str(home), "PYTHONUNBUFFERED": "1", **env}
        self.env.setdefault("SPARQ_ENTRYPOINT_MODULES", "tests")  # its test models
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def stack(self) -> Stack:
        return Stack(
            api=f"http://127.0.0.1:{self.port}",
            mlflow=f"http://127.0.0.1:{self.mlflow_port}",
            home=self.home,
            proc=self.procs[-1],
        )

    def start(self) -> Stack:
        log = (self.home / f"up-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(self.port),
             "--mlflow-port", str(self.mlflow_port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)
        wait_http(f"{self.stack.api}/v1/health", timeout=180, proc=proc)
        return self.stack

    def kill9(self) -> None:
        """kill -9 of the `sparq up` process alone (its servers die with it)."""
        proc = self.procs[-1]
        proc.kill()
        proc.wait(30)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path / "home")
    u.home.mkdir()
    yield u
    u.stop()
    _kill_matching(str(u.home))  # drivers or servers a killed stack left behind


def _kill_matching(text: str) -> None:
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _wait_for(cond: Any, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _mlflow_server_pid(port: int) -> int:
    out = subprocess.run(
        ["pgrep", "-f", f"mlflow.*server.*--port {port}"], capture_output=True, text=True
    ).stdout.split()
    assert out, f"no MLflow server on port {port}"
    return min(int(p) for p in out)  # the server, not its gunicorn/uvicorn worker


def _mlflow_holds_the_job(stack: Stack, job: dict[str, Any], n_trials: int) -> None:
    """Every trial's run with its metrics and checkpoint; hypervolume at every step;
    the registered model's alias."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(stack.mlflow, registry_uri=stack.mlflow)
    parent = job["mlflow"]["run_id"]
    runs = c.search_runs(
        [job["mlflow"]["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    trial_ids = [r.data.tags["sparq.trial_id"] for r in runs]
    assert len(trial_ids) == len(set(trial_ids)) == n_trials  # every trial once
    for r in runs:
        assert r.info.status == "FINISHED"
        assert {"accuracy", "size_bytes"} <= r.data.metrics.keys()
        assert "model.sparq" in {a.path for a in c.list_artifacts(r.info.run_id)}
    steps = sorted(m.step for m in c.get_metric_history(parent, "hypervolume"))
    assert set(range(1, n_trials + 1)) <= set(steps)
    mv = c.get_model_version_by_alias(f"sparq-{job['name']}", "best")
    assert mv.run_id == parent


def test_mlflow_down_mid_job_loses_nothing(up: Up) -> None:
    stack = up.start()
    job_id = stack.post({**SPEC, "name": "outage"})["id"]
    _wait_for(lambda: stack.job(job_id)["trials_completed"] >= 2, "two trials")
    pid = _mlflow_server_pid(up.mlflow_port)
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    time.sleep(45)
    # started again as `sparq up` starts it: the same store, artifacts and port
    server = start_mlflow(up.home, port=up.mlflow_port, wait=False)
    up.procs.insert(0, server.proc)  # stopped with the stack
    try:
        server.ready()
        job = stack.wait(job_id, timeout=400)
        assert job["status"] == "succeeded", job
        assert (job["trials_completed"], job["trials_failed"]) == (8, 0)
        assert job["mlflow"]["synced"]
        assert not any("MLflow" in w for w in job["warnings"]), job["warnings"]
        _mlflow_holds_the_job(stack, job, 8)
    finally:
        server.stop()


def test_stack_killed_with_kill_9_and_started_again_resumes_the_job(up: Up) -> None:
    stack = up.start()
    spec = {**SPEC, "name": "restart", "search_space": {"finetune_epochs": 10}}
    job_id = stack.post(spec)["id"]
    _wait_for(lambda: stack.job(job_id)["trials_completed"] >= 2, "two trials")
    before = {t["trial_id"]: t for t in httpx.get(f"{stack.api}/v1/jobs/{job_id}/trials").json()}
    up.kill9()
    stack = up.start()  # same SPARQ_HOME, same ports
    job = stack.wait(job_id, timeout=500)
    assert job["status"] == "succeeded", job
    assert job["restarts"] == 1
    assert (job["trials_completed"], job["trials_failed"]) == (8, 0)
    trials = httpx.get(f"{stack.api}/v1/jobs/{job_id}/trials").json()
    assert sorted(t["number"] for t in trials) == list(range(1, 9))  # none lost or doubled
    after = {t["trial_id"]: t for t in trials}
    for trial_id, t in before.items():  # finished before the kill: kept, not trained again
        if t["status"] == "completed":
            assert after[trial_id]["accuracy"] == t["accuracy"]
            assert after[trial_id]["duration_s"] == t["duration_s"]
    _mlflow_holds_the_job(stack, job, 8)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(stack.mlflow)
    for trial_id, t in before.items():
        if t["status"] == "completed":
            history = c.get_metric_history(after[trial_id]["mlflow_run_id"], "train_loss")
            assert len(history) == 10  # one training: one value per fine-tune epoch


def test_api_killed_while_drivers_run_adopts_them(up: Up, tmp_path: Path) -> None:
    """Ray outside the stack (as in a cluster): kill -9 of `sparq up` leaves the driver
    running on it; the next `sparq up` adopts it (pid + start time), counts it in
    SPARQ_MAX_RUNNING_JOBS, and the job completes without a restart."""
    head = _ray_head(tmp_path)
    try:
        up.env.update(
            SPARQ_RAY_ADDRESS=head["address"],
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=head["token"],
        )
        stack = up.start()
        spec = {**SPEC, "name": "adopted", "search_space": {"finetune_epochs": 60},
                "search": {"trials": 8, "concurrency": 2, "seed": 4}}  # fmt: skip
        first = stack.post(spec)["id"]
        _wait_for(lambda: stack.job(first)["status"] == "running", "the driver")
        db = st.JobStore(f"sqlite:///{up.home / 'sparq.db'}")
        pid = db.get(first).driver_pid
        up.kill9()
        stack = up.start()
        behind = {**SMALL, "name": "queued-behind", "search": {"trials": 2, "concurrency": 2}}
        second = stack.post(behind)["id"]
        time.sleep(2)
        job, now = stack.job(first), db.get(first)
        assert job["status"] == "running", job  # its driver lived on: adopted
        assert now.driver_pid == pid
        assert stack.job(second)["status"] == "queued"  # the adopted driver holds the slot
        job = stack.wait(first, timeout=400)
        assert job["status"] == "succeeded", job
        assert job["restarts"] == 0  # adopted, not resumed
        assert (job["trials_completed"], job["trials_failed"]) == (8, 0)
        assert db.get(first).driver_pid == pid  # the same driver ran it to the end
        assert stack.wait(second, timeout=400)["status"] == "succeeded"
        db.close()
    finally:
        head["proc"].send_signal(signal.SIGTERM)
        head["proc"].wait(60)


def _ray_head(tmp_path: Path) -> dict[str, Any]:
    """A Ray head outside the stack, with token auth as the stack's."""
    token = tmp_path / "ray_token"
    token.write_text("a" * 64)
    token.chmod(0o600)
    port = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = tmp_path / "ray.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "false",
         "--disable-usage-stats", "--num-cpus", str(os.cpu_count() or 2)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    _wait_for(lambda: b"Ray runtime started" in log.read_bytes(), "the Ray head", 120)
    return {"proc": proc, "address": f"127.0.0.1:{port}", "token": str(token)}
