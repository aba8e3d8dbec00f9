"""A real multi-node Ray cluster on this machine, started the way an operator starts
one on VMs: ``ray start --head --block`` and ``ray start --address ... --block`` per
worker node, each node its own ``--num-cpus``, token authentication as
``service/stack.py`` sets it up (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH).

Every node is a local process group here. Ray 2.60 resolves ``--node-ip-address
127.0.0.1`` to the host's outward address, so the head ends up on that one; worker
``i`` gets ``127.0.0.{i + 2}`` (loopback on Linux): a node of its own IP, hence its
own node id and node name, and a search driver that ``ray.init``s by address always
attaches to the head's raylet (the only one on the host's address), never to a worker
node a test may kill.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.stack import _die_with_parent, free_port

RAY = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]


@dataclass
class RayNode:
    name: str
    ip: str
    num_cpus: int
    proc: subprocess.Popen[bytes]
    log: Path
    node_id: str = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 the node's process group (``ray start``, raylet, agents, workers)
        and reap ``ray start``: a machine that lost power, as far as Ray can tell."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self, timeout: float = 45) -> None:
        """SIGTERM to ``ray start`` alone: it drains the node and stops its processes
        (signalling the whole group at once would kill the head's GCS under the drain,
        which then waits 30 s for it); whatever is left then gets SIGKILL."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


@dataclass
class RayCluster:
    address: str
    token_path: Path
    temp_dir: Path
    head: RayNode
    workers: list[RayNode] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What every process that joins the cluster needs (nodes, drivers, `sparq up`)."""
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def _start(self, name: str, ip: str, num_cpus: int, args: list[str]) -> RayNode:
        log = self.temp_dir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.env)
        # The GCS declares a node dead after 3 missed 1 s health checks (Ray's default:
        # 5 missed 3 s ones), so a killed worker node is noticed within seconds.
        env.update(
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        cmd = [
            *RAY, *args, "--node-ip-address", ip, "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--dashboard-agent-listen-port", str(free_port()),
        ]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        node = RayNode(name, ip, num_cpus, proc, log)
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                node.stop()
                raise RuntimeError(f"ray node {name} did not start; see {log}:\n{log.read_text()}")
            time.sleep(0.2)
        return node

    def add_worker(self, num_cpus: int) -> RayNode:
        i = len(self.workers)
        node = self._start(f"worker{i}", f"127.0.0.{i + 2}", num_cpus, ["--address", self.address])
        self.workers.append(node)
        self._learn_node_ids()
        return node

    def nodes(self) -> list[dict[str, Any]]:
        """``ray.nodes()`` from a separate process (the test process never joins Ray)."""
        code = (
            "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False);"
            "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'],"
            " 'alive': n['Alive'], 'cpus': n['Resources'].get('CPU', 0)} for n in ray.nodes()]))"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        out = subprocess.run(
            [sys.executable, "-c", code, self.address], env={**env, **self.env},
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return list(json.loads(out.stdout.strip().splitlines()[-1]))

    def _learn_node_ids(self) -> None:
        """Every node's id, by its IP; waits until all of them are alive."""
        deadline = time.monotonic() + 60
        while True:
            alive = [n for n in self.nodes() if n["alive"]]
            by_ip = {n["ip"]: n["id"] for n in alive}
            workers = {w.ip for w in self.workers if w.alive()}
            if workers <= by_ip.keys() and len(alive) == 1 + len(workers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes did not all join: {alive}")
            time.sleep(0.5)
        for w in self.workers:
            w.node_id = by_ip.get(w.ip, w.node_id)
        (self.head.node_id,) = {i for ip, i in by_ip.items() if ip not in workers}

    def stop(self) -> None:
        for w in self.workers:
            if w.alive():
                w.proc.send_signal(signal.SIGTERM)  # drain all workers at once
        for w in self.workers:
            w.stop()
        self.head.stop()


@contextmanager
def ray_cluster(head_cpus: int, worker_cpus: list[int]) -> Iterator[RayCluster]:
    """A head with ``head_cpus`` and one worker node per entry of ``worker_cpus``.

    The temp dir is short (Unix socket paths are limited to 107 bytes) and the
    cluster's own, so concurrent Ray sessions on the machine never share one."""
    temp_dir = Path(tempfile.mkdtemp(prefix="sparq-ray-", dir="/tmp"))
    token = temp_dir / "ray_auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", token, temp_dir, head=None)  # type: ignore[arg-type]
    cluster.head = cluster._start(
        "head", "127.0.0.1", head_cpus,
        ["--head", "--port", str(port), "--include-dashboard", "false",
         "--temp-dir", str(temp_dir / "ray")],
    )  # fmt: skip
    try:
        for cpus in worker_cpus:
            cluster.add_worker(cpus)
        if not worker_cpus:
            cluster._learn_node_ids()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
