"""MLflow through ``MlflowClient`` with explicit run ids: no fluent active run,
which is thread-local global state and misbehaves in servers and Ray workers.
Everything goes over HTTP to the MLflow server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM = 6000  # MLflow's limit on a param value


def client(tracking_uri: str) -> MlflowClient:
    # The registry is the same server: never whatever MLFLOW_REGISTRY_URI / the process's
    # global tracking URI happen to name (MLflow resolves the registry from those).
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_for(c: MlflowClient, job_name: str) -> str:
    """One MLflow experiment per job name (``sparq/<name>``), created on first use."""
    name = f"sparq/{job_name}"
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(c.create_experiment(name))
    except Exception:  # another driver created it between our two calls
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:_MAX_PARAM]) for k, v in values.items()]


def log_batches(
    c: MlflowClient, run_id: str, metrics: Sequence[Metric] = (), params: Sequence[Param] = ()
) -> int:
    """``log_batch`` as many times as MLflow's limits ask (at most 1000 items, 100 of
    them params, per request); returns the number of requests."""
    requests = 0
    while metrics or params:
        p, params = params[:100], params[100:]
        m, metrics = metrics[: 1000 - len(p)], metrics[1000 - len(p) :]
        c.log_batch(run_id, metrics=list(m), params=list(p))
        requests += 1
    return requests


def log_params(c: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    log_batches(c, run_id, params=_params(params))


def log_metrics(c: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log metrics at ``step`` in one request."""
    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class RunLogger:
    """A run's metrics, params and small JSON artifacts, sent from a background thread
    in batches.

    Whatever was logged since the last send goes in one ``log_batch`` request, at most
    every ``interval_s``: a training loop never waits on HTTP, and a trial of N epochs
    costs a few requests rather than N. :meth:`close` sends the rest and raises the
    first error, so nothing is lost or dropped silently; close it before ending the run.

    (MLflow's own ``synchronous=False`` logging sends one request per call, and ending
    a run waits up to a second for its queue thread to notice: a second per trial.)
    """

    def __init__(self, c: MlflowClient, run_id: str, *, interval_s: float = 2.0) -> None:
        self.c, self.run_id, self.interval_s = c, run_id, interval_s
        self._cond = threading.Condition()
        self._metrics: list[Metric] = []
        self._params: list[Param] = []
        self._dicts: list[tuple[Any, str]] = []
        self._closed = False
        self._error: BaseException | None = None
        self.requests = 0  # log_batch calls made
        self._thread = threading.Thread(target=self._run, name="sparq-run-logger", daemon=True)
        self._thread.start()

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._add(metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def params(self, values: Mapping[str, Any]) -> None:
        self._add(params=_params(values))

    def dict(self, obj: Any, artifact_file: str) -> None:
        """``MlflowClient.log_dict``, from the thread."""
        self._add(dicts=[(obj, artifact_file)])

    def _add(
        self,
        *,
        metrics: Sequence[Metric] = (),
        params: Sequence[Param] = (),
        dicts: Sequence[tuple[Any, str]] = (),
    ) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"RunLogger of run {self.run_id} used after close()")
            self._metrics.extend(metrics)
            self._params.extend(params)
            self._dicts.extend(dicts)

    def close(self) -> None:
        """Send everything logged so far; raise the first error of any send."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed:
                    self._cond.wait(self.interval_s)
                metrics, self._metrics = self._metrics, []
                params, self._params = self._params, []
                dicts, self._dicts = self._dicts, []
                closed = self._closed
            if self._error is None:
                try:
                    self.requests += log_batches(self.c, self.run_id, metrics, params)
                    for obj, artifact_file in dicts:
                        self.c.log_dict(self.run_id, obj, artifact_file)
                except Exception as e:  # raised by close()
                    self._error = e
            if closed:
                return


def set_tags(c: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else v
    return out


def child_runs(c: MlflowClient, experiment_id: str, parent_id: str) -> list[Any]:
    """Every (not deleted) child run of a parent run."""
    return list(
        c.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
            max_results=50_000,
        )
    )


def trial_run(
    c: MlflowClient,
    experiment_id: str,
    parent_id: str,
    trial_id: str,
    name: str,
    job_id: str,
    *,
    resumed: bool = False,
) -> Any:
    """The child run of a trial: in a resumed job, the one a previous attempt created
    (a trial rerun after its driver died), if any; else a new one. Never two runs for
    one trial. A job that was never resumed has no earlier attempt to look for."""
    if resumed:
        found = c.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`sparq.trial_id` = '{trial_id}'"
            ),
            max_results=1,
        )
        if found:
            return found[0]
    tags = {PARENT_TAG: parent_id, "sparq.job_id": job_id, "sparq.trial_id": trial_id}
    return c.create_run(experiment_id, run_name=name, tags=tags)


def delete_orphan_runs(
    c: MlflowClient, experiment_id: str, parent_id: str, keep: set[str]
) -> list[str]:
    """Delete child runs whose trial the search no longer knows: trials started in the
    instant before a driver died, which the resumed search sampled afresh."""
    gone = [
        r.info.run_id
        for r in child_runs(c, experiment_id, parent_id)
        if r.data.tags.get("sparq.trial_id") not in keep
    ]
    for run_id in gone:
        c.delete_run(run_id)
    return gone


def register_model(
    c: MlflowClient,
    run_id: str,
    artifact_path: str,
    *,
    name: str,
    alias: str = "best",
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> Any:
    """Register ``runs:/<run_id>/<artifact_path>`` as a new version of the registered
    model ``name`` (created on first use) and point ``alias`` at it. Returns the
    ``ModelVersion``; ``models:/<name>@<alias>`` then resolves to its files."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name, description=description)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = c.create_model_version(
        name,
        source=f"runs:/{run_id}/{artifact_path}",
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        description=description,
    )
    c.set_registered_model_alias(name, alias, mv.version)
    return mv


def replace_table(c: MlflowClient, run_id: str, data: Any, artifact_file: str) -> None:
    """``log_table`` that replaces the table instead of appending to it.

    ``MlflowClient.log_table`` appends rows to an existing file, so logging the
    current front after every trial would pile up stale rows. The first call goes
    through ``log_table`` (it registers the file as a table for the UI); later ones
    overwrite it in the same JSON "split" format.
    """
    import posixpath
    import tempfile
    from pathlib import Path

    folder, name = posixpath.split(artifact_file)
    if artifact_file not in {a.path for a in c.list_artifacts(run_id, folder or None)}:
        c.log_table(run_id, data=data, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        data.to_json(path, orient="split", index=False, date_format="iso")
        c.log_artifact(run_id, str(path), folder or None)
