"""The ``sparq`` command line: run the stack, submit and watch jobs, fetch and
evaluate checkpoints. torch and ray are imported only by the commands that need
them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console

from service import views
from service.client import Client, ClientError
from service.settings import Settings, get_settings, is_loopback
from service.spec import WEIGHTS_ID

if TYPE_CHECKING:
    from service.stack import RayHead

app = typer.Typer(
    help="sparq: search for the best way to compress a PyTorch model.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(soft_wrap=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="SPARQ_URL", help="sparq service URL")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="SPARQ_TOKEN", help="bearer token")]
DEFAULT_URL = "http://127.0.0.1:8000"

DEMO_SPEC: dict[str, Any] = {
    "name": "demo",
    "model": {"builtin": "digits-mlp"},
    "dataset": {"builtin": "digits"},
    "search": {"trials": 40, "concurrency": 2, "seed": 0},
}


def _fail(msg: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}")
    return typer.Exit(code)


def _client(url: str, token: str | None) -> Client:
    return Client(url, token)


def _settings_for(host: str, port: int, mlflow_port: int) -> Settings:
    os.environ["SPARQ_MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
    os.environ["SPARQ_PUBLIC_URL"] = f"http://{host}:{port}"
    get_settings.cache_clear()
    return get_settings().prepare()


def _start_ray(settings: Settings) -> tuple[Settings, RayHead | None]:
    """One Ray head for the stack's lifetime, unless SPARQ_RAY_ADDRESS names a cluster."""
    from service.stack import start_ray

    if settings.ray_address:
        return settings, None
    console.print("starting a local Ray head ...")
    head = start_ray(settings.home, settings.ray_num_cpus)
    os.environ["SPARQ_RAY_ADDRESS"] = head.address
    get_settings.cache_clear()
    return get_settings().prepare(), head


def _allowed_code(settings: Settings) -> str:
    """What code a job may run, as ``sparq up`` says it."""
    from workers import entrypoints

    allowed = entrypoints.prefixes(settings.entrypoint_modules)
    if not allowed:
        return f"builtins only (allow your package's entrypoints with {entrypoints.ENV})"
    return f"builtins and entrypoints under {', '.join(allowed)} ({entrypoints.ENV})"


@app.command()
def up(
    host: Annotated[str, typer.Option(help="address the REST service listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="REST service port")] = 8000,
    mlflow_port: Annotated[int, typer.Option(help="MLflow server port (127.0.0.1)")] = 5000,
) -> None:
    """Run the stack in the foreground: MLflow server, REST service, job launcher."""
    import uvicorn

    from service.api import create_app
    from service.stack import StackError, start_mlflow

    settings = _settings_for(host, port, mlflow_port)
    if not is_loopback(host) and not settings.api_tokens:
        raise _fail(
            f"--host {host} is not a loopback address and no API tokens are set; set "
            "SPARQ_API_TOKENS (comma-separated, 16+ characters each) or listen on 127.0.0.1",
            2,
        )
    try:
        mlflow = start_mlflow(
            settings.home,
            "127.0.0.1",
            mlflow_port,
            backend_uri=settings.mlflow_backend_uri,
            artifacts_destination=settings.mlflow_artifacts_destination,
            wait=False,  # the Ray head starts while MLflow does
        )
    except StackError as e:
        raise _fail(str(e)) from e
    head = None
    try:
        settings, head = _start_ray(settings)
        mlflow.ready()
        console.print(
            f"MLflow UI   {mlflow.url}\nAPI docs    http://{host}:{port}/docs\n"
            f"Ray         {settings.ray_address}\nSPARQ_HOME  {settings.home}\n"
            f"Models      {_allowed_code(settings)}"
        )
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    except StackError as e:
        raise _fail(str(e)) from e
    finally:
        if head is not None:
            head.stop()
        mlflow.stop()


def watch(client: Client, job_id: str, *, poll_s: float = 1.0) -> dict[str, Any]:
    """Progress bar plus the front as it grows, redrawn in place until the job ends."""
    return views.watch(client, job_id, console, poll_s=poll_s)


def _wait_synced(client: Client, job: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """After the outcome, MLflow's copy (the model, its registration, the final views)
    follows through the job's outbox: wait for it, boundedly, before the demo stops
    the MLflow server it started. What is not sent by then is sent by the next
    `sparq up` on this SPARQ_HOME (the job's warnings say so)."""
    deadline = time.monotonic() + timeout
    while not job["mlflow"].get("synced") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = client.job(job["id"])
    return job


def _summary(job: dict[str, Any]) -> None:
    console.print(
        f"job {job['id']}: [bold]{job['status']}[/bold]  trials {job['trials_completed']}"
        f" done, {job['trials_failed']} failed of {job['trials_total']}"
    )
    if job.get("baseline"):
        b = job["baseline"]
        console.print(f"  float baseline: accuracy {b['accuracy']:.4f}, {b['size_bytes']:,} bytes")
    if job.get("best"):
        b = job["best"]
        console.print(
            f"  exported: trial {b['trial_id']}, accuracy {b['accuracy']:.4f}, "
            f"{b['size_bytes']:,} bytes ({b['compression']:.1f}x smaller)"
        )
    for key in ("message", "error"):
        if job.get(key):
            console.print(f"  {key}: {job[key]}")
    for warning in job.get("warnings") or []:
        console.print(f"  [yellow]warning:[/yellow] {warning}")
    if job["mlflow"].get("ui_url"):
        console.print(f"  MLflow: {job['mlflow']['ui_url']}")


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise _fail(f"cannot read job spec {path}: {e}", 2) from e
    if not isinstance(data, dict):
        raise _fail(f"{path} must hold a mapping (the job spec), not {type(data).__name__}", 2)
    return data


def upload_local_weights(client: Client, spec: dict[str, Any], base: Path) -> dict[str, Any]:
    """The spec with ``baseline.weights`` naming a file on this machine (relative: to
    ``base``, the spec's directory) uploaded and replaced by its id: the service reads
    no client paths. Anything else is left for the service to judge (an id, or a path
    under its SPARQ_WEIGHTS_DIRS)."""
    baseline = spec.get("baseline")
    if not isinstance(baseline, dict):
        return spec
    weights = baseline.get("weights")
    if not isinstance(weights, str) or WEIGHTS_ID.fullmatch(weights):
        return spec
    path = Path(weights).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        return spec
    up = client.upload_weights(path)
    console.print(f"uploaded {path} ({up['size_bytes']} bytes) as weights [bold]{up['id']}[/bold]")
    return {**spec, "baseline": {**baseline, "weights": up["id"]}}


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="job spec, YAML or JSON")],
    wait: Annotated[bool, typer.Option("--wait", help="watch until the job ends")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    upload: Annotated[
        bool,
        typer.Option(
            "--upload/--no-upload",
            help="upload baseline.weights when it names a local file (--no-upload: leave "
            "it as a path on the service, under its SPARQ_WEIGHTS_DIRS)",
        ),
    ] = True,
) -> None:
    """Submit a compression job."""
    client = _client(url, token)
    try:
        body = _load_spec(spec)
        if upload:
            body = upload_local_weights(client, body, spec.parent)
        job = client.submit(body)
        console.print(f"submitted job [bold]{job['id']}[/bold]")
        if wait:
            job = watch(client, job["id"])
            job = _wait_synced(client, job)
            _summary(job)
            if job["status"] != "succeeded":
                raise typer.Exit(1)
    except ClientError as e:
        raise _fail(str(e), 2 if e.status == 422 else 1) from e


@app.command()
def status(
    job_id: str,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a job's status: progress bar, the front so far, the outcome."""
    try:
        job, front = views.snapshot(_client(url, token), job_id)
    except ClientError as e:
        raise _fail(str(e)) from e
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        console.print(views.job_view(job, front))
        _summary(job)


@app.command("watch")
def watch_cmd(
    job_id: str,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    poll: Annotated[float, typer.Option(help="seconds between updates", min=0.2)] = 1.0,
) -> None:
    """Watch a job until it ends: a progress bar and the front, redrawn live."""
    try:
        job = watch(_client(url, token), job_id, poll_s=poll)
    except ClientError as e:
        raise _fail(str(e)) from e
    _summary(job)
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def pareto(
    job_id: str,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a job's Pareto front (accuracy vs size)."""
    try:
        data = _client(url, token).pareto(job_id)
    except ClientError as e:
        raise _fail(str(e)) from e
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(views.front_table(data))


@app.command()
def download(
    job_id: str,
    output: Annotated[Path | None, typer.Option("-o", "--output")] = None,
    trial: Annotated[
        str | None, typer.Option(help="a front point other than the exported one")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Download a job's compressed checkpoint."""
    out = output or Path(f"{job_id}{'-' + trial if trial else ''}.sparq")
    try:
        path = _client(url, token).download(job_id, out, trial)
    except ClientError as e:
        raise _fail(str(e)) from e
    console.print(f"saved {path} ({path.stat().st_size:,} bytes)")


@app.command()
def cancel(job_id: str, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Cancel a job; finished trials are kept."""
    try:
        job = _client(url, token).cancel(job_id)
    except ClientError as e:
        raise _fail(str(e)) from e
    console.print(f"job {job_id}: {job['status']} (cancel requested)")


def evaluate_checkpoint(
    path: Path, allow_modules: tuple[str, ...] = (), teacher_weights: Path | None = None
) -> dict[str, Any]:
    """Reload a checkpoint with one call and re-measure it on its own dataset.

    Entrypoints the header names (model, dataset) are imported only from
    ``allow_modules`` (and ``$SPARQ_ENTRYPOINT_MODULES``). A distillation job's
    checkpoint is measured against its teacher: the model as its spec builds it, with
    ``teacher_weights`` (a state dict file) loaded into it when given; the header says
    which the job used (a ``baseline.weights`` teacher is not in the checkpoint, so
    such a checkpoint needs ``teacher_weights``)."""
    import torch

    from workers import entrypoints
    from workers.compress.train import evaluate, make_loader
    from workers.jobs import _ckpt_safety as safety
    from workers.jobs.checkpoint import load_checkpoint, size_report
    from workers.zoo.data import build_datasets

    ck = load_checkpoint(path, allow_modules=allow_modules)
    bound = size_report(path.read_bytes())
    if ck.dataset_spec is None:
        raise ValueError(f"{path} names no dataset to evaluate on")
    allowed = entrypoints.allowed_prefixes(allow_modules)
    if ck.dataset_spec.entrypoint:  # allowed by load_checkpoint; its function must be too
        safety.import_allowed(ck.dataset_spec.entrypoint, "dataset.entrypoint", allowed)
    _, val = build_datasets(ck.dataset_spec, allowed)
    teacher = None
    from service.tasks import get_task

    if get_task(ck.task).needs_teacher:
        teacher = _teacher(ck.model_spec, ck.meta.get("teacher"), allowed, teacher_weights)
    elif teacher_weights is not None:
        raise ValueError(f"--teacher: a {ck.task} checkpoint is measured without a teacher")
    loader = make_loader(val, 512, shuffle=False)
    result = evaluate(ck.model, loader, torch.device("cpu"), ck.task, teacher)
    return {
        **({"cosine": result.cosine} if teacher is not None else {}),
        "accuracy": result.accuracy,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "size_bytes": path.stat().st_size,
        "info_bound_bytes": bound["bound_bytes"],
        "bytes_over_bound": bound["ratio"],
        "parameters": sum(p.numel() for p in ck.model.parameters()),
    }


def _teacher(model_spec: Any, said: Any, allowed: tuple[str, ...], weights: Path | None) -> Any:
    """The teacher of a distillation checkpoint, as its header says (``said``: the
    ``teacher`` of its meta; written since checkpoints carry it) and ``weights``."""
    from workers.compress.train import Teacher
    from workers.jobs.baseline import read_state_dict
    from workers.zoo.models import build_model

    said = said if isinstance(said, dict) else {}
    if said.get("source") == "baseline.weights" and weights is None:
        raise ValueError(
            "this checkpoint's job distilled from its baseline.weights, which the "
            "checkpoint does not hold: pass them with --teacher FILE (.pt/.pth/.npz)"
        )
    model = build_model(model_spec, allowed)
    if weights is not None:
        try:
            state = read_state_dict(weights)
            model.load_state_dict(state)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"--teacher={str(weights)!r}: {e}") from None
    from pydantic import ValidationError

    from service.spec import DistillationSpec

    try:  # the loss as the job's spec validated it: one list of losses
        loss = DistillationSpec.model_validate({"loss": said.get("loss", "auto")}).loss
    except ValidationError as e:
        raise ValueError(f"the checkpoint's meta.teacher.loss: {e.errors()[0]['msg']}") from None
    return Teacher(model, loss)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    allow_module: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-module",
            help="a module (or dotted prefix) whose entrypoints the checkpoint may name; "
            "repeatable. Never the standard library or sparq's own packages.",
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            exists=True,
            dir_okay=False,
            help="a distillation checkpoint's teacher weights (the job's baseline.weights "
            "state dict, .pt/.pth/.npz); without it the teacher is the model as its spec "
            "builds it (a pretrained model as it arrives)",
        ),
    ] = None,
) -> None:
    """Reload a .sparq checkpoint and measure its accuracy and size."""
    from workers.errors import CheckpointError, SparqError

    if not checkpoint.is_file():
        raise _fail(f"no checkpoint file at {checkpoint}", 2)
    try:
        out = evaluate_checkpoint(checkpoint, tuple(allow_module or ()), teacher)
    except CheckpointError as e:
        raise _fail(str(e), 2) from None
    except (SparqError, ValueError) as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps(out))
    else:
        said = (
            f"cosine {out['cosine']:.4f}" if "cosine" in out else f"accuracy {out['accuracy']:.4f}"
        )
        console.print(f"{checkpoint}: {said}, {out['size_bytes']:,} bytes")


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="REST service port (a free one if taken)")] = 8000,
    mlflow_port: Annotated[int, typer.Option(help="MLflow port (a free one if taken)")] = 5000,
    trials: Annotated[int, typer.Option(help="trials of the demo search")] = 40,
    keep_running: Annotated[bool, typer.Option(help="keep serving after the job ends")] = False,
) -> None:
    """Start the stack, run a joint search on digits, download the best checkpoint."""
    from service.api import create_app
    from service.stack import free_port, port_in_use, serve_in_thread, start_mlflow

    host = "127.0.0.1"
    port = free_port() if port_in_use(host, port) else port
    mlflow_port = free_port() if port_in_use(host, mlflow_port) else mlflow_port
    settings = _settings_for(host, port, mlflow_port)
    console.print(f"SPARQ_HOME {settings.home}; starting MLflow on :{mlflow_port}")
    mlflow = start_mlflow(settings.home, host, mlflow_port, wait=False)
    head = None
    try:
        settings, head = _start_ray(settings)
        mlflow.ready()
        with serve_in_thread(create_app(settings), host, port) as url:
            client = Client(url)
            spec = {**DEMO_SPEC, "search": {**DEMO_SPEC["search"], "trials": trials}}
            job = client.submit(spec)
            console.print(
                f"submitted job [bold]{job['id']}[/bold]: joint bits + sparsity "
                f"search on digits, {trials} trials"
            )
            job = watch(client, job["id"])
            job = _wait_synced(client, job)
            _summary(job)
            if job["status"] != "succeeded" or not job.get("best"):
                raise _fail(
                    f"the demo job ended {job['status']}: {job.get('error') or job.get('message')}"
                )
            out = client.download(job["id"], settings.home / f"demo-{job['id']}.sparq")
            again = evaluate_checkpoint(out)
            console.print(
                f"reloaded {out}: accuracy {again['accuracy']:.4f}, {again['size_bytes']:,} bytes"
            )
            console.print(
                f"\nMLflow UI   {job['mlflow']['ui_url']}\nAPI docs    {url}/docs\n"
                f"checkpoint  {out}\n"
                f"(run `sparq up --port {port} --mlflow-port {mlflow_port}` to browse "
                "them again)"
            )
            if keep_running:
                console.print("serving; Ctrl-C to stop")
                while True:
                    time.sleep(3600)
    finally:
        if head is not None:
            head.stop()
        mlflow.stop()


if __name__ == "__main__":
    app()
