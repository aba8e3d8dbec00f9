"""The REST API (FastAPI; OpenAPI at /docs).

Route handlers raise domain errors; one table maps them to HTTP status codes, and
every request body error becomes a 422 naming the field, the value and the rule.
Nothing a client can send yields a 500.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from dashboards import FrontPoint, sparq_front
from service import store as st
from service.flusher import Flusher
from service.launcher import Launcher
from service.schemas import Health, JobView, Measured, ParetoPoint, ParetoView, TrialView
from service.settings import Settings, get_settings
from service.spec import JobSpec, front_quality

VERSION = "0.1.0"


class ApiError(Exception):
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class Unauthorized(ApiError):
    status_code = 401


ERROR_STATUS: dict[type[Exception], int] = {
    st.JobNotFound: 404,
    LookupError: 404,
    NotFound: 404,
    Conflict: 409,
    Unauthorized: 401,
    ApiError: 400,
}


def _status_for(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def validation_details(errors: list[Any]) -> list[dict[str, Any]]:
    """Pydantic errors as ``{field, value, rule}``: what was wrong, where, and why."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        out.append(
            {
                "field": ".".join(loc) or "body",
                "value": _json_safe(err.get("input")),
                "rule": str(err.get("msg", "invalid")).removeprefix("Value error, "),
            }
        )
    return out


def _unprocessable(errors: list[Any]) -> JSONResponse:
    details = validation_details(errors)
    summary = "; ".join(f"{d['field']}={d['value']!r}: {d['rule']}" for d in details)
    return JSONResponse(
        status_code=422, content={"message": f"invalid job spec: {summary}", "detail": details}
    )


def create_app(settings: Settings | None = None, *, launch: bool = True) -> FastAPI:
    """The app. ``launch=False`` serves the store without starting drivers (tests)."""
    settings = (settings or get_settings()).prepare()
    store = st.JobStore(settings.db_url)
    launcher = Launcher(settings, store)
    flusher = Flusher(settings, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if launch:
            launcher.start()
            flusher.start()
        try:
            yield
        finally:
            if launch:
                flusher.stop()
                launcher.stop()
            store.close()

    app = FastAPI(
        title="sparq",
        version=VERSION,
        summary="Search for the best way to compress a PyTorch model.",
        lifespan=lifespan,
    )
    app.state.store, app.state.launcher, app.state.settings = store, launcher, settings

    @app.exception_handler(RequestValidationError)
    async def _on_request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _unprocessable(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _on_spec_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return _unprocessable(list(exc.errors()))

    for exc_type in ERROR_STATUS:

        async def _on_domain(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(status_code=_status_for(exc), content={"message": str(exc)})

        app.add_exception_handler(exc_type, _on_domain)

    def require_token(request: Request) -> None:
        if not settings.api_tokens:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(token.encode(), t.encode()) for t in settings.api_tokens
        ):
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")

    auth: Any = Depends(require_token)
    uri = settings.mlflow_tracking_uri

    @app.get("/v1/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", version=VERSION, tracking_uri=uri)

    @app.post("/v1/jobs", status_code=201, response_model=JobView, dependencies=[auth])
    def create_job(spec: JobSpec) -> Any:
        weights = spec.baseline.weights
        if weights and not (os.path.isfile(weights) and os.access(weights, os.R_OK)):
            rule = "no readable file at this path on the service (the workers read it too)"
            return _unprocessable([{"loc": ("baseline", "weights"), "input": weights, "msg": rule}])
        job = store.create(spec.model_dump(mode="json"))
        launcher.poke()
        return JobView.of(job, uri)

    @app.get("/v1/jobs", response_model=list[JobView], dependencies=[auth])
    def list_jobs(status: str | None = None, limit: int = 100) -> list[JobView]:
        allowed = {st.QUEUED, st.RUNNING, *st.TERMINAL}
        if status is not None and status not in allowed:
            raise ApiError(f"status={status!r} is not one of {sorted(allowed)}")
        if not 1 <= limit <= 1000:
            raise ApiError(f"limit={limit} must be in 1..1000")
        return [JobView.of(j, uri) for j in store.list_jobs(status=status, limit=limit)]

    @app.get("/v1/jobs/{job_id}", response_model=JobView, dependencies=[auth])
    def get_job(job_id: str) -> JobView:
        return JobView.of(store.get(job_id), uri)

    @app.get("/v1/jobs/{job_id}/trials", response_model=list[TrialView], dependencies=[auth])
    def list_trials(job_id: str) -> list[TrialView]:
        store.get(job_id)
        return [TrialView.of(t) for t in store.trials(job_id)]

    @app.get("/v1/jobs/{job_id}/pareto", response_model=ParetoView, dependencies=[auth])
    def pareto(job_id: str) -> ParetoView:
        job = store.get(job_id)
        done = {t.trial_id: t for t in store.trials(job_id) if t.status == st.TRIAL_COMPLETED}
        baseline, points = None, []
        if job.baseline_size_bytes and job.baseline_accuracy is not None:
            baseline = Measured(accuracy=job.baseline_accuracy, size_bytes=job.baseline_size_bytes)
            task = str((job.spec or {}).get("task", "classification"))
            front = sparq_front(
                [
                    FrontPoint(
                        t.trial_id, front_quality(task, t.accuracy, t.loss), t.size_bytes or 0
                    )
                    for t in done.values()
                ],
                job.baseline_size_bytes,
            )
            points = [
                ParetoPoint(
                    trial_id=p.trial_id,
                    accuracy=done[p.trial_id].accuracy or 0.0,
                    loss=done[p.trial_id].loss,
                    size_bytes=p.size_bytes,
                    compression=job.baseline_size_bytes / p.size_bytes,
                    policy=done[p.trial_id].policy or {},
                )
                for p in front.points
            ]
        return ParetoView(
            job_id=job.id,
            status=job.status,
            baseline=baseline,
            hypervolume=job.hypervolume,
            chosen_trial_id=job.best_trial_id,
            points=points,
        )

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView, dependencies=[auth])
    def cancel(job_id: str) -> JobView:
        return JobView.of(launcher.cancel(job_id), uri)

    def _file(path: str | None, what: str, filename: str) -> FileResponse:
        if not path or not Path(path).is_file():
            raise Conflict(f"{what} has no checkpoint yet")
        return FileResponse(path, media_type="application/octet-stream", filename=filename)

    @app.get("/v1/jobs/{job_id}/checkpoint", dependencies=[auth])
    def checkpoint(job_id: str) -> FileResponse:
        job = store.get(job_id)
        why = f"job {job_id} ({job.status}{': ' + job.message if job.message else ''})"
        return _file(job.best_checkpoint, why, f"{job_id}.sparq")

    @app.get("/v1/jobs/{job_id}/trials/{trial_id}/checkpoint", dependencies=[auth])
    def trial_checkpoint(job_id: str, trial_id: str) -> FileResponse:
        trial = store.trial(job_id, trial_id)
        return _file(trial.checkpoint, f"trial {trial_id}", f"{job_id}-{trial_id}.sparq")

    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.api:app_factory``."""
    return create_app()
