"""A throwaway PostgreSQL server for the tests: ``initdb`` in a fresh temp dir,
``pg_ctl start`` on a free loopback port (and a Unix socket in that dir only),
``createdb`` per database, stopped and deleted afterwards.

PostgreSQL refuses to run as root, so as root the server runs as ``nobody`` (the
temp dir is handed to it); otherwise as the current user. Trust authentication on
loopback only: nothing but this machine's processes can reach it, and it lives for
one test session.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from service.stack import free_port

USER = "sparq"  # the cluster's superuser


def pg_bin() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``: on PATH, or Debian's versioned one."""
    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent  # e.g. a symlink into /usr/lib/postgresql/15/bin
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    return Path(dirs[-1]) if dirs and Path(dirs[-1], "initdb").exists() else None


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int
    run_as: list[str]

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.run_as, str(self.bin / tool), *args],
            check=True, capture_output=True, text=True, timeout=120, cwd="/",
        )  # fmt: skip

    def url(self, db: str = USER) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{db}"

    def createdb(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.url(name)


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    bindir = pg_bin()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
    root = Path(tempfile.mkdtemp(prefix="sparq-pg-", dir="/tmp"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)  # nobody:nogroup
        run_as = ["runuser", "-u", "nobody", "--"]
    data = root / "data"
    pg = Postgres(bindir, data, free_port(), run_as)
    started = False
    try:
        pg._run("initdb", "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
                "--no-sync", "--no-instructions")  # fmt: skip
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={pg.port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        pg._run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-o", opts,
                "-w", "-t", "60", "start")  # fmt: skip
        started = True
        yield pg
    except subprocess.CalledProcessError as e:
        log = root / "server.log"
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"{e.cmd} failed: {e.stderr}\n{tail}") from e
    finally:
        if started:
            pg._run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
