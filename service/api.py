"""The REST API (FastAPI; OpenAPI at /docs).

Route handlers raise domain errors (``workers.errors.SparqError`` subclasses); one
table, ``ERROR_STATUS``, maps them to HTTP status codes, and every request body error
becomes a 422 naming the field, the value and the rule. Nothing a client can send
yields a 500; anything else a handler raises is a bug, answered 500 with a message
that tells nothing of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dashboards import hypervolume_reference_text, job_front, quality
from service import store as st
from service import weights as wt
from service.flusher import Flusher
from service.launcher import Launcher
from service.schemas import (
    ERROR_RESPONSES,
    Health,
    JobPage,
    JobSummary,
    JobView,
    ParetoBaseline,
    ParetoPoint,
    ParetoView,
    TrialView,
    WeightsView,
)
from service.secrets import known_secrets, scrub
from service.settings import Settings, get_settings
from service.spec import JobSpec
from service.tasks import get_task
from service.warm import WarmDrivers
from service.warm import enabled as warm_enabled
from workers import entrypoints
from workers.errors import (
    Conflict,
    Invalid,
    NotFound,
    SparqError,
    TooLarge,
    TooMany,
    Unauthorized,
)

VERSION = "0.1.0"


# The one table from domain errors to status codes, walked by the exception's MRO.
# Only SparqError classes: a builtin (a KeyError in a handler) is a bug, answered 500.
ERROR_STATUS: dict[type[SparqError], int] = {
    NotFound: 404,  # store.JobNotFound, store.TrialNotFound, weights not yours
    Unauthorized: 401,
    Conflict: 409,
    Invalid: 422,  # entrypoints.NotAllowed too
    TooMany: 429,
    TooLarge: 413,
}
INTERNAL_ERROR = "internal error; the service's log has the details"


def _status_for(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    try:
        json.dumps(value, allow_nan=False)  # what the response can carry (no NaN)
    except (TypeError, ValueError):
        return repr(value)
    return value


class _NonFinite:
    def __init__(self, text: str) -> None:
        self.text = text


def _finite_float(text: str) -> Any:
    v = float(text)
    return v if math.isfinite(v) else _NonFinite(text)  # 1e400 parses as inf


def non_finite_fields(body: bytes) -> list[dict[str, Any]] | None:
    """Errors (``loc``, ``input``, ``msg``) for each NaN/Infinity in a JSON body (also
    in free-form kwargs); ``None`` when the body is not JSON (FastAPI answers that)."""
    try:
        tree = json.loads(body, parse_constant=_NonFinite, parse_float=_finite_float)
    except RecursionError:
        return [{"loc": (), "input": "...", "msg": "JSON nested too deeply"}]
    except ValueError:
        return None
    errors: list[dict[str, Any]] = []
    todo: list[tuple[tuple[str, ...], Any]] = [((), tree)]
    while todo:  # iterative: no recursion limit on a deep body
        loc, node = todo.pop()
        if isinstance(node, _NonFinite):
            rule = "must be a finite number (NaN and Infinity are not allowed)"
            errors.append({"loc": loc, "input": node.text, "msg": rule})
        elif isinstance(node, dict):
            todo.extend(((*loc, str(k)), v) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend(((*loc, str(i)), v) for i, v in enumerate(node))
    return sorted(errors, key=lambda e: e["loc"])


class BodyGuard:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before anything parses it
    (by Content-Length, and by counting a streamed body); a JSON body holding NaN or
    Infinity anywhere gets 422 naming the fields. The body is then replayed.

    ``streamed``: POST paths whose route streams its body to disk and counts it itself
    (path -> limit, setting): only their Content-Length is checked here, against
    their own limit, and the body passes through unread."""

    def __init__(
        self, app: Any, max_bytes: int, streamed: dict[str, tuple[int, str]] | None = None
    ) -> None:
        self.app, self.max_bytes, self.streamed = app, max_bytes, streamed or {}

    @staticmethod
    def _too_large(limit: int, setting: str) -> JSONResponse:
        return JSONResponse(
            status_code=413,
            content={"message": str(TooLarge(limit, setting)), "limit_bytes": limit},
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        stream = self.streamed.get(scope.get("path", "")) if scope["method"] == "POST" else None
        limit, setting = stream or (self.max_bytes, "SPARQ_MAX_REQUEST_BYTES")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(limit, setting)(scope, receive, send)
            return
        if stream:
            await self.app(scope, receive, send)
            return
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await self._too_large(limit, setting)(scope, receive, send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        if body:
            errors = non_finite_fields(body)
            if errors:
                await _unprocessable(errors)(scope, receive, send)
                return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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


def _unprocessable(errors: list[Any], what: str = "job spec") -> JSONResponse:
    details = validation_details(errors)
    summary = "; ".join(f"{d['field']}={d['value']!r}: {d['rule']}" for d in details)
    return JSONResponse(
        status_code=422, content={"message": f"invalid {what}: {summary}", "detail": details}
    )


MAX_PAGE = 100


def _encode_cursor(job: st.Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) of the last job of the previous page; opaque to clients."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except (binascii.Error, ValueError, TypeError) as e:
        raise Invalid("cursor", cursor, "not a cursor this service gave out") from e


def create_app(settings: Settings | None = None, *, launch: bool = True) -> FastAPI:
    """The app. ``launch=False`` serves the store without starting drivers (tests)."""
    settings = (settings or get_settings()).prepare()
    secrets = known_secrets(settings)
    store = st.JobStore(settings.db_url, secrets)
    warm = WarmDrivers(settings) if launch and warm_enabled(settings) else None
    launcher = Launcher(settings, store, spawner=warm)
    flusher = Flusher(settings, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if launch:
            if warm is not None:
                warm.start()
            launcher.start()
            flusher.start()
        try:
            yield
        finally:
            if launch:
                flusher.stop()
                launcher.stop()
                if warm is not None:
                    warm.stop()
            store.close()

    app = FastAPI(
        title="sparq",
        version=VERSION,
        summary="Search for the best way to compress a PyTorch model.",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,  # every route's errors, as the handlers below shape them
    )
    app.state.store, app.state.launcher, app.state.settings = store, launcher, settings
    weights_limit = (settings.max_weights_bytes, "SPARQ_MAX_WEIGHTS_BYTES")
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_request_bytes,
        streamed={"/v1/weights": weights_limit},
    )

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body it cannot parse, an unknown route, a method
        # the route lacks), shaped as every other error
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(
            status_code=exc.status_code, content={"message": message}, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _on_request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _unprocessable(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _on_spec_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return _unprocessable(list(exc.errors()))

    async def _on_domain(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, Invalid):
            problem = {"loc": tuple(exc.field.split(".")), "input": exc.value, "msg": exc.rule}
            return _unprocessable([problem], "request")
        content: dict[str, Any] = {"message": str(exc)}
        if isinstance(exc, TooLarge):
            content["limit_bytes"] = exc.limit_bytes
        return JSONResponse(status_code=_status_for(exc), content=content)

    for exc_type in ERROR_STATUS:
        app.add_exception_handler(exc_type, _on_domain)

    @app.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # anything else is a bug: a 500 that tells nothing of it (its text may quote
        # a path or a secret); Starlette re-raises it after, so the log has it all
        return JSONResponse(status_code=500, content={"message": INTERNAL_ERROR})

    principals = settings.principals

    def require_token(request: Request) -> str | None:
        """The request's principal (also ``request.state.principal``); None without
        tokens (one user on loopback)."""
        request.state.principal = None
        if not principals:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        found = None
        for known, name in principals.items():  # every token compared: constant time
            if hmac.compare_digest(token.encode(), known.encode()):
                found = name
        if scheme.lower() != "bearer" or found is None:
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
        request.state.principal = found
        return found

    auth: Any = Depends(require_token)
    allowed_modules = entrypoints.prefixes(settings.entrypoint_modules)
    admins = frozenset(settings.admin_principals)
    uri = settings.mlflow_tracking_uri
    hide = partial(scrub, secrets=secrets)

    def whose(principal: str | None) -> str | None:
        """Whose jobs a principal sees: its own; everyone's for an admin, and without
        tokens (one user)."""
        return None if principal is None or principal in admins else principal

    def visible(job_id: str, principal: str | None) -> st.Job:
        """The job, if the principal may see it. Another's job is answered exactly as
        one that does not exist, so that its id is not confirmed."""
        job = store.get(job_id)
        owner = whose(principal)
        if owner is not None and job.owner != owner:
            raise st.JobNotFound(job_id)
        return job

    roots = wt.Roots.of(settings)

    @app.get("/v1/health", response_model=Health)
    def health() -> Health:
        return Health(status="ok", version=VERSION)

    @app.post("/v1/jobs", status_code=201, response_model=JobView)
    def create_job(spec: JobSpec, principal: str | None = auth) -> Any:
        refused = _refused_entrypoints(spec, allowed_modules)
        if refused:
            return _unprocessable(refused)
        weights = spec.baseline.weights
        if weights:
            try:  # an upload of this principal's, or a file under SPARQ_WEIGHTS_DIRS
                wt.check(weights, roots, principal)
            except wt.Refused as e:
                problem = {"loc": ("baseline", "weights"), "input": weights, "msg": str(e)}
                return _unprocessable([problem])
        queued = store.count(status=st.JobStatus.QUEUED, owner=principal)  # admins' own too
        if queued >= settings.max_queued_jobs:
            whose_jobs = f"jobs of {principal!r}" if principal else "jobs"
            per = " per principal" if principal else ""
            raise TooMany(
                f"{queued} {whose_jobs} are queued, the limit is {settings.max_queued_jobs}"
                f"{per} (SPARQ_MAX_QUEUED_JOBS); retry when some have started"
            )
        job = store.create(spec.model_dump(mode="json"), owner=principal)
        launcher.poke()
        return JobView.of(job, uri, hide=hide)

    @app.get("/v1/jobs", response_model=JobPage)
    def list_jobs(
        status: st.JobStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
        principal: str | None = auth,
    ) -> Any:
        before = _decode_cursor(cursor) if cursor else None
        jobs = store.page(status=status, limit=limit + 1, before=before, owner=whose(principal))
        more, jobs = len(jobs) > limit, jobs[:limit]
        return JobPage(
            jobs=[JobSummary.of(j, uri, hide=hide) for j in jobs],
            next_cursor=_encode_cursor(jobs[-1]) if more else None,
        )

    @app.get("/v1/jobs/{job_id}", response_model=JobView)
    def get_job(job_id: str, principal: str | None = auth) -> JobView:
        return JobView.of(visible(job_id, principal), uri, hide=hide)

    @app.get("/v1/jobs/{job_id}/trials", response_model=list[TrialView])
    def list_trials(job_id: str, principal: str | None = auth) -> list[TrialView]:
        visible(job_id, principal)
        return [TrialView.of(t, hide=hide) for t in store.trials(job_id)]

    @app.get("/v1/jobs/{job_id}/pareto", response_model=ParetoView)
    def pareto(job_id: str, principal: str | None = auth) -> ParetoView:
        job = visible(job_id, principal)
        done = {t.trial_id: t for t in store.trials(job_id) if t.status == st.TrialStatus.COMPLETED}
        task = str((job.spec or {}).get("task", "classification"))
        baseline, points = None, []
        if job.baseline_size_bytes and job.baseline_accuracy is not None:
            base = {"accuracy": job.baseline_accuracy, "loss": job.baseline_loss}
            baseline = ParetoBaseline(
                accuracy=job.baseline_accuracy,
                loss=job.baseline_loss,
                quality=quality(task, base),
                size_bytes=job.baseline_size_bytes,
            )
            front = job_front(task, done.values(), job.baseline_size_bytes)
            points = [
                ParetoPoint(
                    trial_id=p.trial_id,
                    accuracy=done[p.trial_id].accuracy or 0.0,
                    loss=done[p.trial_id].loss,
                    quality=p.accuracy,
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
            hypervolume_reference=hypervolume_reference_text(task),
            quality_label=get_task(task).quality_label,
            accuracy_label=get_task(task).accuracy_label,
            chosen_trial_id=job.best_trial_id,
            points=points,
        )

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView)
    def cancel(job_id: str, principal: str | None = auth) -> JobView:
        visible(job_id, principal)
        return JobView.of(launcher.cancel(job_id), uri, hide=hide)

    @app.post(
        "/v1/weights",
        status_code=201,
        response_model=WeightsView,
        dependencies=[auth],
        openapi_extra={"requestBody": UPLOAD_BODY},
    )
    async def upload_weights(
        request: Request,
        filename: Annotated[
            str | None,
            Query(
                max_length=255,
                pattern=r"^[^/\\]+\.(pt|pth|npz)$",
                description="the file's name; its suffix says how it is read (else sniffed)",
            ),
        ] = None,
    ) -> WeightsView:
        """Upload a state dict (the body: the file's bytes) for ``baseline.weights`` of
        this principal's jobs. Checked now with the loader the baseline uses."""
        roots.uploads.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=roots.uploads, prefix=".upload-", suffix=".part")
        tmp = Path(name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():  # to disk as it comes, counted
                    size += len(chunk)
                    if size > weights_limit[0]:
                        raise TooLarge(*weights_limit)
                    digest.update(chunk)
                    f.write(chunk)
            if not size:
                rule = f"the body is empty; it must be the bytes of a state dict file ({SUFFIXES})"
                raise Invalid("body", "", rule)
            suffix = wt.suffix_of(tmp, filename)
            tmp = tmp.replace(tmp.with_name(tmp.stem + suffix))  # the loader goes by it
            problem = await run_in_threadpool(_state_dict_problem, tmp)
            if problem:
                rule = f"must be a state dict of tensors ({SUFFIXES}): {problem}"
                raise Invalid("body", filename or f"{size} bytes", rule)
            meta = wt.keep(
                roots,
                tmp,
                suffix=suffix,
                owner=request.state.principal,
                sha256=digest.hexdigest(),
                size_bytes=size,
                filename=filename,
            )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _weights_view(meta)

    def _own_upload(weights_id: str, request: Request) -> dict[str, Any]:
        meta = wt.read_meta(roots, weights_id)
        if meta is None or meta.get("owner") != request.state.principal:
            raise NotFound(f"no uploaded weights {weights_id!r} of yours")
        return meta

    @app.get("/v1/weights/{weights_id}", response_model=WeightsView, dependencies=[auth])
    def get_weights(weights_id: str, request: Request) -> WeightsView:
        return _weights_view(_own_upload(weights_id, request))

    @app.delete("/v1/weights/{weights_id}", response_model=WeightsView, dependencies=[auth])
    def delete_weights(weights_id: str, request: Request) -> WeightsView:
        """Forget an upload (a queued job naming it then fails at its baseline)."""
        meta = _own_upload(weights_id, request)
        wt.forget(roots, meta)
        return _weights_view(meta)

    def _file(path: str | None, what: str, filename: str) -> FileResponse:
        if not path or not Path(path).is_file():
            raise Conflict(f"{what} has no checkpoint yet")
        return FileResponse(path, media_type="application/octet-stream", filename=filename)

    @app.get("/v1/jobs/{job_id}/checkpoint")
    def checkpoint(job_id: str, principal: str | None = auth) -> FileResponse:
        job = visible(job_id, principal)
        why = f"job {job_id} ({job.status}{': ' + hide(job.message) if job.message else ''})"
        return _file(job.best_checkpoint, why, f"{job_id}.sparq")

    @app.get("/v1/jobs/{job_id}/trials/{trial_id}/checkpoint")
    def trial_checkpoint(job_id: str, trial_id: str, principal: str | None = auth) -> FileResponse:
        visible(job_id, principal)
        trial = store.trial(job_id, trial_id)
        return _file(trial.checkpoint, f"trial {trial_id}", f"{job_id}-{trial_id}.sparq")

    return app


def _refused_entrypoints(spec: JobSpec, allowed: tuple[str, ...]) -> list[dict[str, Any]]:
    """Problems for the spec's entrypoints the operator has not allowed (decided on
    the names alone: nothing is imported here; the workers check again)."""
    out = []
    for field, source in (("model", spec.model), ("dataset", spec.dataset)):
        if source.entrypoint is None:
            continue
        try:
            entrypoints.check(source.entrypoint, f"{field}.entrypoint", allowed)
        except entrypoints.NotAllowed as e:
            out.append({"loc": (field, "entrypoint"), "input": source.entrypoint, "msg": e.rule})
    return out


SUFFIXES = "read with torch.load(weights_only=True) for .pt/.pth, without pickle for .npz"
UPLOAD_BODY = {
    "required": True,
    "description": "the bytes of a state dict file (at most SPARQ_MAX_WEIGHTS_BYTES)",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _state_dict_problem(path: Path) -> str | None:
    """Why ``path`` is not a state dict the baseline task would load, or None."""
    from workers.jobs.baseline import read_state_dict  # torch: on the first upload only

    try:
        read_state_dict(path)
    except ValueError as e:
        return " ".join(str(e).split())  # torch's message spans paragraphs
    return None


def _weights_view(meta: dict[str, Any]) -> WeightsView:
    return WeightsView(**{k: meta.get(k) for k in WeightsView.model_fields})


def app_factory() -> FastAPI:
    """For ``uvicorn --factory service.api:app_factory``."""
    return create_app()
