"""The job store: jobs and their trials in SQLAlchemy (SQLite in WAL mode by
default, any URL SQLAlchemy accepts otherwise).

It is the one source of truth for job state. The service creates jobs and asks for
cancellation; the search driver (a separate process) writes progress, trials and
the outcome; the launcher records which driver process runs a job (pid, start time,
Ray address) and marks jobs whose driver died.

Every text written (a job's ``error``, ``message`` and ``warnings``, a trial's
``error``) has the store's secrets hidden first (:func:`service.secrets.scrub`): the
secrets its process knows, passed at construction, and the password in its own URL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from service.secrets import scrub, url_password
from workers.errors import NotFound


class JobStatus(StrEnum):
    """A job's status. Stored as its string (a ``String`` column: rows written before
    the enum read back unchanged, and compare equal to the members)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class TrialStatus(StrEnum):
    """A recorded trial's status (a trial is recorded once it has finished)."""

    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"  # by early stopping


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The principal who submitted it (SPARQ_API_TOKENS); None: no tokens, one user
    owner: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    driver_pid: Mapped[int | None] = mapped_column(Integer)
    # The driver's start time (/proc/PID/stat field 22), so a reused pid is never
    # taken for our driver, and the Ray address it joined (a restarted stack's is new).
    driver_started: Mapped[str | None] = mapped_column(String(32))
    driver_ray_address: Mapped[str | None] = mapped_column(String(200))
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # driver relaunches (resume)
    error: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(Text)
    trials_total: Mapped[int] = mapped_column(Integer, default=0)
    trials_completed: Mapped[int] = mapped_column(Integer, default=0)
    trials_failed: Mapped[int] = mapped_column(Integer, default=0)
    trials_stopped: Mapped[int] = mapped_column(Integer, default=0)  # by early stopping
    baseline_accuracy: Mapped[float | None] = mapped_column(Float)
    baseline_loss: Mapped[float | None] = mapped_column(Float)
    baseline_size_bytes: Mapped[int | None] = mapped_column(Integer)
    front_size: Mapped[int] = mapped_column(Integer, default=0)
    hypervolume: Mapped[float | None] = mapped_column(Float)
    best_trial_id: Mapped[str | None] = mapped_column(String(64))
    best_accuracy: Mapped[float | None] = mapped_column(Float)
    best_size_bytes: Mapped[int | None] = mapped_column(Integer)
    best_checkpoint: Mapped[str | None] = mapped_column(Text)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)  # said by the driver
    # what the engine does not do as asked, per layer, and why (said at the job's set-up)
    layers_left_dense: Mapped[dict[str, str] | None] = mapped_column(JSON)
    layers_adjusted: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # MLflow's copy of the job: outbox bytes not yet sent, and whether all was sent
    mlflow_pending: Mapped[int | None] = mapped_column(Integer)
    mlflow_synced: Mapped[bool] = mapped_column(Boolean, default=False)


class Trial(Base):
    __tablename__ = "trials"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    trial_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    policy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    accuracy: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    size_bytes: Mapped[int | None] = mapped_column(Integer)
    bops: Mapped[float | None] = mapped_column(Float, default=None)  # see docs: BOPs
    relative_bops: Mapped[float | None] = mapped_column(Float, default=None)
    duration_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    checkpoint: Mapped[str | None] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    node_id: Mapped[str | None] = mapped_column(String(64), default=None)  # Ray node it ran on
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=utcnow)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # service and drivers write concurrently
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} does not exist")
        self.job_id = job_id

    def __reduce__(self) -> Any:
        return (type(self), (self.job_id,))


class TrialNotFound(NotFound):
    def __init__(self, job_id: str, trial_id: str) -> None:
        super().__init__(f"job {job_id!r} has no trial {trial_id!r}")
        self.job_id, self.trial_id = job_id, trial_id

    def __reduce__(self) -> Any:
        return (type(self), (self.job_id, self.trial_id))


# Columns added after the first release, with the SQL default that fills old rows.
_ADDED_COLUMNS = {
    ("jobs", "restarts"): "INTEGER NOT NULL DEFAULT 0",
    ("jobs", "trials_stopped"): "INTEGER NOT NULL DEFAULT 0",
    ("jobs", "driver_started"): "VARCHAR(32)",
    ("jobs", "driver_ray_address"): "VARCHAR(200)",
    ("jobs", "warnings"): "JSON NOT NULL DEFAULT '[]'",
    ("trials", "bops"): "FLOAT",
    ("trials", "relative_bops"): "FLOAT",
    ("jobs", "mlflow_pending"): "INTEGER",
    ("jobs", "mlflow_synced"): "BOOLEAN NOT NULL DEFAULT FALSE",
    ("trials", "node_id"): "VARCHAR(64)",
    ("jobs", "owner"): "VARCHAR(64)",
    ("jobs", "layers_left_dense"): "JSON",
    ("jobs", "layers_adjusted"): "JSON",
}


def _add_missing_columns(engine: Engine) -> None:
    """Bring a store written by an older sparq up to date: add the columns it lacks
    (additive changes only; nothing is ever dropped or rewritten)."""
    from sqlalchemy import inspect, text

    insp = inspect(engine)
    for (table, column), ddl in _ADDED_COLUMNS.items():
        if column not in {c["name"] for c in insp.get_columns(table)}:
            with engine.begin() as conn:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))


class JobStore:
    """Thin, explicit data access. Every method is one short transaction."""

    def __init__(self, url: str, secrets: Iterable[str] = ()) -> None:
        self.secrets = frozenset(secrets) | url_password(url)
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session.begin() as s:
            yield s

    def _scrubbed(self, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` with the secrets hidden from their texts (user code's errors may
        quote anything the process can read)."""
        out = dict(fields)
        for key in ("error", "message"):
            if isinstance(out.get(key), str):
                out[key] = scrub(out[key], self.secrets)
        if out.get("warnings"):
            out["warnings"] = [scrub(str(w), self.secrets) for w in out["warnings"]]
        return out

    def create(self, spec: dict[str, Any], owner: str | None = None) -> Job:
        job = Job(
            id=uuid.uuid4().hex[:12],
            name=str(spec.get("name", "default")),
            spec=spec,
            owner=owner,
            status=JobStatus.QUEUED,
            created_at=utcnow(),
            trials_total=int(spec["search"]["trials"]),
        )
        with self.session() as s:
            s.add(job)
        return job

    def get(self, job_id: str) -> Job:
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job

    def list_jobs(self, status: JobStatus | None = None, limit: int | None = 100) -> list[Job]:
        """Newest first; ``limit=None``: all of them."""
        q = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status:
            q = q.where(Job.status == status)
        with self.session() as s:
            return list(s.scalars(q))

    def page(
        self,
        status: JobStatus | None,
        limit: int,
        before: tuple[datetime, str] | None = None,
        owner: str | None = None,
    ) -> list[Job]:
        """Newest first (``created_at``, then ``id``), after ``before`` (the last job of
        the previous page): a stable cursor order even for jobs created at once. With
        ``owner``: only that principal's jobs; without: everyone's."""
        q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        if status:
            q = q.where(Job.status == status)
        if owner is not None:
            q = q.where(Job.owner == owner)
        if before is not None:
            created, job_id = before
            q = q.where(
                or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
            )
        with self.session() as s:
            return list(s.scalars(q))

    def count(self, status: JobStatus | None = None, owner: str | None = None) -> int:
        """Jobs (in ``status``), of ``owner`` only if given."""
        q = select(func.count()).select_from(Job)
        if status:
            q = q.where(Job.status == status)
        if owner is not None:
            q = q.where(Job.owner == owner)
        with self.session() as s:
            return int(s.scalar(q) or 0)

    def queued_ids(self, limit: int, exclude: Collection[str] = ()) -> list[str]:
        """The next jobs to start: ids of queued jobs no one asked to cancel, oldest
        first, at most ``limit`` (the launcher's free slots), without ``exclude`` (jobs
        whose driver is already starting). Ids only: a poll reads no specs."""
        if limit <= 0:
            return []
        q = (
            select(Job.id)
            .where(Job.status == JobStatus.QUEUED, Job.cancel_requested.is_not(True))
            .order_by(Job.created_at.asc(), Job.id.asc())
            .limit(limit)
        )
        if exclude:
            q = q.where(Job.id.not_in(list(exclude)))
        with self.session() as s:
            return list(s.scalars(q))

    def update(self, job_id: str, **fields: Any) -> Job:
        with self.session() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(job_id)
            for k, v in self._scrubbed(fields).items():
                setattr(job, k, v)
            return job

    def transition(self, job_id: str, allowed_from: Collection[JobStatus], **fields: Any) -> bool:
        """Set fields only if the job's status is in ``allowed_from`` (compare-and-set).

        One ``UPDATE ... WHERE id = :id AND status IN (...)`` judged by its row count,
        so of two racing transitions (a cancel and a driver's claim) exactly one wins on
        any database; a read then a write would let both win where SELECT takes no lock
        (SQLite). Whether the job exists is asked only when nothing was updated."""
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.status.in_(list(allowed_from)))
            .values(**self._scrubbed(fields))
            .execution_options(synchronize_session=False)
        )
        with self.session() as s:
            result = s.execute(stmt)
            assert isinstance(result, CursorResult)
            if result.rowcount:
                return True
            if s.get(Job, job_id) is None:
                raise JobNotFound(job_id)
            return False

    def upsert_trial(self, job_id: str, trial_id: str, **fields: Any) -> Trial:
        with self.session() as s:
            trial = s.get(Trial, (job_id, trial_id))
            fields = self._scrubbed(fields)
            if trial is None:
                trial = Trial(job_id=job_id, trial_id=trial_id, **fields)
                s.add(trial)
            else:
                for k, v in fields.items():
                    setattr(trial, k, v)
            return trial

    def unsynced_finished(self) -> list[str]:
        """Ids of finished jobs whose MLflow copy is not complete yet."""
        q = select(Job.id).where(Job.status.in_(TERMINAL), Job.mlflow_synced.is_(False))
        with self.session() as s:
            return list(s.scalars(q))

    def update_trial(self, job_id: str, trial_id: str, **fields: Any) -> bool:
        """Set fields of a trial if it is recorded; returns whether it was."""
        with self.session() as s:
            trial = s.get(Trial, (job_id, trial_id))
            if trial is None:
                return False
            for k, v in self._scrubbed(fields).items():
                setattr(trial, k, v)
            return True

    def trials(self, job_id: str) -> list[Trial]:
        with self.session() as s:
            q = select(Trial).where(Trial.job_id == job_id).order_by(Trial.number)
            return list(s.scalars(q))

    def trial(self, job_id: str, trial_id: str) -> Trial:
        with self.session() as s:
            trial = s.get(Trial, (job_id, trial_id))
            if trial is None:
                raise TrialNotFound(job_id, trial_id)
            return trial

    def close(self) -> None:
        self.engine.dispose()


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
