"""What the REST API returns (views); what clients send is ``service.spec.JobSpec``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel

from service import store as st


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)  # the store keeps UTC without a zone


# RFC 3339 as the schema's date-time says: with its zone, e.g. 2026-12-02T10:13:26Z
Time = Annotated[datetime, AfterValidator(_utc)]
# Hides the service's secrets from a text (``service.secrets.scrub`` with them): the
# store hides them as it writes, the views again as they show (a row written by a
# process that knew fewer secrets, or before there was hiding)
Hide = Callable[[str], str]


def _hidden(text: str | None, hide: Hide) -> str | None:
    return None if text is None else hide(text)


class Measured(BaseModel):
    accuracy: float
    size_bytes: int


class Best(Measured):
    trial_id: str
    compression: float | None = None


class MlflowLinks(BaseModel):
    tracking_uri: str
    experiment_id: str | None
    run_id: str | None
    ui_url: str | None
    # MLflow's copy: bytes of the job's outbox not sent yet (None: not known yet), and
    # whether everything the job wrote has reached MLflow
    pending_bytes: int | None = None
    synced: bool = False


class JobSummary(BaseModel):
    """A job in a listing: everything of :class:`JobView` but the spec."""

    id: str
    name: str
    owner: str | None = None  # the principal who submitted it (never a token); None: no tokens
    status: st.JobStatus
    created_at: Time
    started_at: Time | None
    finished_at: Time | None
    trials_total: int
    trials_completed: int
    trials_failed: int
    trials_stopped: int
    front_size: int
    hypervolume: float | None
    baseline: Measured | None
    best: Best | None
    mlflow: MlflowLinks
    error: str | None
    message: str | None
    cancel_requested: bool
    restarts: int
    warnings: list[str] = []  # what to know that did not change the outcome
    # layer -> why structured pruning leaves it dense (its channels reach the output, ...)
    layers_left_dense: dict[str, str] = {}
    # layer -> the block size it takes instead of a requested one its width does not divide
    layers_adjusted: dict[str, str] = {}

    @classmethod
    def of(cls, job: st.Job, tracking_uri: str, *, hide: Hide) -> Self:
        return cls(**cls._fields_of(job, tracking_uri, hide))

    @classmethod
    def _fields_of(cls, job: st.Job, tracking_uri: str, hide: Hide) -> dict[str, Any]:
        baseline = best = None
        if job.baseline_accuracy is not None and job.baseline_size_bytes:
            baseline = Measured(accuracy=job.baseline_accuracy, size_bytes=job.baseline_size_bytes)
        if job.best_trial_id and job.best_accuracy is not None and job.best_size_bytes:
            best = Best(
                trial_id=job.best_trial_id,
                accuracy=job.best_accuracy,
                size_bytes=job.best_size_bytes,
                compression=(job.baseline_size_bytes or 0) / job.best_size_bytes or None,
            )
        ui = None
        if job.mlflow_experiment_id and job.mlflow_run_id:
            ui = f"{tracking_uri}/#/experiments/{job.mlflow_experiment_id}/runs/{job.mlflow_run_id}"
        return {
            "id": job.id,
            "name": job.name,
            "owner": job.owner,
            "status": job.status,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "trials_total": job.trials_total,
            "trials_completed": job.trials_completed,
            "trials_failed": job.trials_failed,
            "trials_stopped": job.trials_stopped or 0,
            "front_size": job.front_size,
            "hypervolume": job.hypervolume,
            "baseline": baseline,
            "best": best,
            "mlflow": MlflowLinks(
                tracking_uri=tracking_uri,
                experiment_id=job.mlflow_experiment_id,
                run_id=job.mlflow_run_id,
                ui_url=ui,
                pending_bytes=job.mlflow_pending,
                synced=bool(job.mlflow_synced),
            ),
            "error": _hidden(job.error, hide),
            "message": _hidden(job.message, hide),
            "cancel_requested": job.cancel_requested,
            "restarts": job.restarts or 0,
            "warnings": [hide(str(w)) for w in job.warnings or []],
            "layers_left_dense": job.layers_left_dense or {},
            "layers_adjusted": job.layers_adjusted or {},
        }


class JobView(JobSummary):
    """One job, with the spec it was submitted with."""

    spec: dict[str, Any]

    @classmethod
    def _fields_of(cls, job: st.Job, tracking_uri: str, hide: Hide) -> dict[str, Any]:
        return {**super()._fields_of(job, tracking_uri, hide), "spec": job.spec}


class JobPage(BaseModel):
    """``GET /v1/jobs``: newest first; ``next_cursor`` fetches the next page (``None``
    on the last)."""

    jobs: list[JobSummary]
    next_cursor: str | None


class TrialView(BaseModel):
    trial_id: str
    number: int
    status: st.TrialStatus
    accuracy: float | None
    loss: float | None
    size_bytes: int | None
    bops: float | None = None
    relative_bops: float | None = None
    duration_s: float | None
    policy: dict[str, Any] | None
    error: str | None
    mlflow_run_id: str | None
    node_id: str | None = None  # the Ray node the trial ran on
    has_checkpoint: bool

    @classmethod
    def of(cls, t: st.Trial, *, hide: Hide) -> TrialView:
        return cls(
            trial_id=t.trial_id,
            number=t.number,
            status=t.status,
            accuracy=t.accuracy,
            loss=t.loss,
            size_bytes=t.size_bytes,
            bops=t.bops,
            relative_bops=t.relative_bops,
            duration_s=t.duration_s,
            policy=t.policy,
            error=_hidden(t.error, hide),
            mlflow_run_id=t.mlflow_run_id,
            node_id=t.node_id,
            has_checkpoint=bool(t.checkpoint),
        )


class ParetoBaseline(Measured):
    """The float baseline in the pareto view, with what the front ranks it by."""

    loss: float | None = None  # mean NLL
    quality: float  # the front's quality axis (the task's: service/tasks.py)


class ParetoPoint(BaseModel):
    trial_id: str
    accuracy: float
    loss: float | None = None  # mean NLL; perplexity = exp(loss) for language modelling
    # the front's quality axis: accuracy, or exp(-loss) for language modelling
    quality: float | None = None
    size_bytes: int
    compression: float
    policy: dict[str, Any]


class ParetoView(BaseModel):
    job_id: str
    status: st.JobStatus
    baseline: ParetoBaseline | None
    hypervolume: float | None
    hypervolume_reference: str  # in words: dashboards.hypervolume_reference_text
    quality_label: str = "accuracy"  # what the front's quality axis is, for this task
    accuracy_label: str = "accuracy"  # what the points' `accuracy` is, for this task
    chosen_trial_id: str | None
    points: list[ParetoPoint]


class WeightsView(BaseModel):
    """An upload of weights (``POST /v1/weights``): ``id`` is what ``baseline.weights``
    takes, for jobs of the same principal only."""

    id: str
    filename: str | None  # as the client named it, if it did
    size_bytes: int
    sha256: str
    created_at: Time


class Health(BaseModel):
    """Liveness, and nothing about where the service's parts are."""

    status: str
    version: str


class ErrorBody(BaseModel):
    """Every 4xx: what went wrong, in one line."""

    message: str


class Problem(BaseModel):
    field: str  # dotted path in the request, e.g. ``search.trials``; ``body`` for all of it
    value: Any  # what was sent there
    rule: str  # what it must be


class InvalidBody(ErrorBody):
    """A 422: each problem with its field, value and rule."""

    detail: list[Problem]


class TooLarge(ErrorBody):
    limit_bytes: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "a request the route cannot use (a body it cannot parse)",
    },
    401: {"model": ErrorBody, "description": "no valid bearer token"},
    404: {
        "model": ErrorBody,
        "description": "no such job, trial or weights (or another principal's)",
    },
    409: {"model": ErrorBody, "description": "not possible in the job's state"},
    413: {
        "model": TooLarge,
        "description": "request body over SPARQ_MAX_REQUEST_BYTES (a weights upload: "
        "SPARQ_MAX_WEIGHTS_BYTES)",
    },
    422: {"model": InvalidBody, "description": "invalid input, per field"},
    429: {"model": ErrorBody, "description": "too many queued jobs of this principal"},
}
