"""Settings from the environment (``SPARQ_*``), behind a cached ``get_settings()``.

Nothing happens at import time: directories are created (private to this user) by
:meth:`Settings.prepare`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import stat
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger("sparq.settings")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARQ_", extra="ignore")

    home: Path = Field(default=Path.home() / ".sparq", description="data directory")
    database_url: str | None = Field(default=None, description="job store; SQLite in home")
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_backend_uri: str | None = Field(
        default=None,
        description="backend store of the MLflow server `sparq up` starts; unset: SQLite in home",
    )
    mlflow_artifacts_destination: str | None = Field(
        default=None,
        description="where that server keeps artifacts (e.g. s3://bucket/path); unset: in home",
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join; unset: each driver starts a local Ray"
    )
    ray_num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray")
    api_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="bearer tokens (comma separated), each 'name:token' (the principal "
        "'name') or a bare token (a principal of its own); empty: no auth",
    )
    admin_principals: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="principals (comma separated) who see every job"
    )
    max_running_jobs: int = Field(default=1, ge=1, description="search drivers at once")
    warm_drivers: bool = Field(
        default=True,
        description="fork search drivers from a process that has imported Ray, Tune, "
        "torch and MLflow once (service/warm.py) instead of starting each cold",
    )
    driver_restarts: int = Field(
        default=2, ge=0, description="times a dead search driver is relaunched to resume its job"
    )
    mlflow_drain_s: float = Field(
        default=30.0,
        ge=0,
        description="seconds a finished job's driver waits for MLflow to take its last "
        "records; what is left is sent by the service when MLflow is back",
    )
    entrypoint_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="module prefixes (comma separated) whose entrypoints job specs and "
        "checkpoints may name (workers/entrypoints.py); empty: builtins only",
    )
    max_request_bytes: int = Field(
        default=1 << 20, ge=1024, description="largest request body accepted (413 beyond)"
    )
    max_queued_jobs: int = Field(
        default=100, ge=1, description="jobs queued at once per principal (429 beyond)"
    )
    weights_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories (comma separated) under which baseline.weights may name a "
        "server path (real path checked); empty: uploads (POST /v1/weights) only",
    )
    max_weights_bytes: int = Field(
        default=512 << 20, ge=1024, description="largest weights upload (413 beyond)"
    )
    public_url: str = Field(default="http://127.0.0.1:8000", description="how clients reach us")

    @field_validator(
        "api_tokens", "entrypoint_modules", "admin_principals", "weights_dirs", mode="before"
    )
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [t.strip() for t in v.split(",") if t.strip()]
        return v

    @field_validator("api_tokens")
    @classmethod
    def _no_placeholders(cls, v: list[str]) -> list[str]:
        for entry in v:
            name, token = _split_token(entry)
            if name is not None and not _PRINCIPAL.fullmatch(name):
                raise ValueError(
                    f"principal {name!r} of SPARQ_API_TOKENS must match {_PRINCIPAL.pattern}"
                )
            if len(token) < 16 or token.lower() in {"changeme", "change-me", "secret"}:
                raise ValueError(
                    "every API token must be at least 16 characters and not a placeholder"
                )
        tokens = [_split_token(e)[1] for e in v]
        if len(set(tokens)) != len(tokens):
            raise ValueError("SPARQ_API_TOKENS names one token twice")
        return v

    @property
    def principals(self) -> dict[str, str]:
        """Token -> the principal it authenticates. ``name:token`` names its principal;
        a bare token is a principal of its own, named by a digest of it (never the
        token itself, which must not reach logs, MLflow or the job store)."""
        out = {}
        for entry in self.api_tokens:
            name, token = _split_token(entry)
            out[token] = name or "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]
        return out

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'sparq.db'}"

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def prepare(self) -> Settings:
        """Create the data directory, private to this user: umask 077 for this process
        and every process it starts (drivers, Ray, MLflow inherit it), so what sparq
        writes (the job store, logs, checkpoints) is 0600 in directories 0700; a home
        left more open than 0700 is closed."""
        os.umask(0o077)
        self.home.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.home.stat().st_mode)
        if mode & 0o077:
            log.warning("SPARQ_HOME %s was open to others (%04o); made it 0700", self.home, mode)
            self.home.chmod(0o700)
        self.jobs_dir.mkdir(exist_ok=True)
        return self


_PRINCIPAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _split_token(entry: str) -> tuple[str | None, str]:
    """``name:token`` -> (name, token); a bare token -> (None, token)."""
    name, sep, token = entry.partition(":")
    return (name.strip(), token.strip()) if sep else (None, entry)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()
