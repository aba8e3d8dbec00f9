"""MLflow through ``MlflowClient`` with explicit run ids: no fluent active run,
which is thread-local global state and misbehaves in servers and Ray workers.
Everything goes over HTTP to the MLflow server.

A job never calls MLflow on its own path: its processes hand records to a
:class:`Recorder` (a stream of the job's durable outbox, :mod:`workers.search.outbox`), and
one :class:`MlflowSender` sends them, in order, retrying with backoff while MLflow is
unreachable. Runs are named by keys (``parent``, ``trial:<id>``) that the sender maps
to MLflow ids, so a record can be written before its run exists on the server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.search import outbox

if TYPE_CHECKING:  # imported where used: a trial's worker records to its outbox only, so
    # it never loads MLflow (about 1.7 s of imports in every trial worker of every job)
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

log = logging.getLogger("sparq.tracking")
PARENT_TAG = "mlflow.parentRunId"
KEY_TAG = "sparq.key"  # the record key a run was created for: found again, never doubled
EXPERIMENT, PARENT, MODEL = "experiment", "parent", "model"
_MAX_PARAM = 6000  # MLflow's limit on a param value


def client(tracking_uri: str) -> MlflowClient:
    # The registry is the same server: never whatever MLFLOW_REGISTRY_URI / the process's
    # global tracking URI happen to name (MLflow resolves the registry from those).
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


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


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else v
    return out


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


def trial_key(trial_id: str) -> str:
    return f"trial:{trial_id}"


def trial_stream(trial_id: str) -> str:
    return f"trial-{trial_id}"


class Recorder:
    """What a process of a job means MLflow to hold, as records of one outbox stream.

    Every method returns at once (a local append); :class:`MlflowSender` sends the
    records. Runs are referred to by key."""

    def __init__(self, root: Path | str, stream: str) -> None:
        self.box = outbox.Outbox.open(root, stream)

    @property
    def root(self) -> Path:
        return self.box.root

    def experiment(self, name: str) -> None:
        self.box.put("experiment", key=EXPERIMENT, name=name)

    def run(self, key: str, name: str, tags: Mapping[str, Any], parent: str | None = None) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        self.box.put("run", key=key, name=name, tags=tags, parent=parent)

    def metrics(self, run: str, values: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)  # fixed here: a record sent twice logs once
        self.box.put(
            "batch", run=run, metrics=[[k, float(v), now, step] for k, v in values.items()]
        )

    def params(self, run: str, values: Mapping[str, Any]) -> None:
        self.box.put("batch", run=run, params={k: str(v)[:_MAX_PARAM] for k, v in values.items()})

    def tags(self, run: str, values: Mapping[str, Any]) -> None:
        self.box.put("batch", run=run, tags={k: str(v) for k, v in values.items()})

    def log_dict(self, run: str, obj: Any, artifact_file: str) -> None:
        self.box.put("dict", run=run, obj=obj, file=artifact_file)

    def table(self, run: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        self.box.put("table", run=run, rows=rows, file=artifact_file)

    def artifact(self, run: str, path: Path | str, folder: str | None = None) -> None:
        """Upload a file that stays where it is until sent (the sender reads it then)."""
        self.box.put("artifact", run=run, path=str(path), folder=folder)

    def artifacts(self, run: str, directory: Path | str, folder: str | None = None) -> None:
        self.box.put("artifacts", run=run, dir=str(directory), folder=folder)

    def status(self, run: str, status: str) -> None:
        """RUNNING, or the run's end: FINISHED, FAILED or KILLED."""
        self.box.put("status", run=run, status=status)

    def register(
        self, run: str, artifact_path: str, *, name: str, tags: Mapping[str, Any], description: str
    ) -> None:
        """A new version of the registered model ``name`` from the run's artifacts, with
        the alias ``best``."""
        self.box.put(
            "register",
            key=MODEL,
            run=run,
            artifact_path=artifact_path,
            name=name,
            tags={k: str(v) for k, v in tags.items()},
            description=description,
        )

    def delete(self, run: str) -> None:
        """Delete a run (or, not sent yet, never create it)."""
        self.box.put("delete", run=run)


# MLflow error codes that mean "this request will never succeed": retried a few
# times, then the record is dropped and said in the job's warnings. Anything else
# (the server down, a 5xx, a timeout) is retried until it goes through.
_REFUSED = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "RESOURCE_DOES_NOT_EXIST",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "MALFORMED_REQUEST",
    }
)
REFUSED_ATTEMPTS = 3
BACKOFF_S = (0.5, 30.0)  # first wait after a failure, and the cap (doubling)


class _Blocked(Exception):
    """A record refers to a run not created yet (its stream is behind): wait."""


def _refused(e: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in _REFUSED
    return isinstance(e, OSError | ValueError | TypeError | KeyError)  # a bad record


class MlflowSender:
    """Sends a job's outbox to MLflow: every stream in order, each record once.

    One pass (:meth:`send_available`) walks the streams, the driver's first; a stream
    stops at a record whose run does not exist yet (another stream creates it) and
    goes on at the next pass. A failure that may pass (MLflow unreachable, a 5xx)
    stops the pass and is retried with backoff; a record MLflow refuses is retried
    ``REFUSED_ATTEMPTS`` times, then dropped and listed in ``state.dropped``.

    ``on_id(key, mlflow_id)`` is told each id as a run, the experiment or the model
    version is created (the job store keeps them); ``on_pending(bytes)`` the bytes
    still to send after each pass that changed it. :meth:`start` runs passes on a
    thread (nudged by :class:`Recorder` puts in this process, else every
    ``poll_s``), at least ``min_gap_s`` apart until :meth:`drain` or :meth:`close`:
    what the trials write in between goes in fewer, larger requests (a trial's epochs
    in one ``log-batch``; of the front's files rewritten after every trial, only the
    last version). The caller must hold :func:`workers.search.outbox.sender_lock`.
    """

    def __init__(
        self,
        root: Path | str,
        tracking_uri: str,
        *,
        on_id: Callable[[str, str], None] | None = None,
        on_pending: Callable[[int], None] | None = None,
        poll_s: float = 0.5,
        min_gap_s: float = 0.0,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.c = client(tracking_uri)
        self.on_id, self.on_pending, self.poll_s = on_id, on_pending, poll_s
        self.min_gap_s = min_gap_s
        self.state = outbox.State.load(self.root)
        self._attempts: dict[tuple[str, int], int] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._draining = threading.Event()  # drain() or close(): no gap between passes
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self._pending: int | None = None
        self.sent = 0  # records sent by this sender

    # -- running -----------------------------------------------------------
    def watch(self, rec: Recorder) -> None:
        """Wake this sender whenever ``rec`` (in this process) appends a record."""
        rec.box._wake.append(self._wake)

    def start(self) -> MlflowSender:
        self._thread = threading.Thread(target=self._run, name="sparq-mlflow-sender", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        wait = BACKOFF_S[0]
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.send_available()
                wait = BACKOFF_S[0]
                self._idle.set()
                # records that come while it waits go in the next pass's requests
                self._draining.wait(self.min_gap_s)
                self._wake.wait(self.poll_s)
            except Exception as e:  # may pass: MLflow down, a 5xx, a timeout
                self._idle.clear()
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.warning("MLflow unavailable (%s); retrying in %.1f s", self.last_error, wait)
                self._stop.wait(wait)
                wait = min(wait * 2, BACKOFF_S[1])

    def drain(self, timeout: float) -> int:
        """Wait until everything written so far is sent, at most ``timeout`` seconds;
        returns the bytes still unsent (0: all of it)."""
        deadline = time.monotonic() + timeout
        self._draining.set()
        while True:
            left = outbox.pending(self.root)
            if left == 0 or time.monotonic() >= deadline:
                return left
            self._wake.set()
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._draining.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)

    # -- one pass ----------------------------------------------------------
    def send_available(self) -> int:
        """Send what can be sent now; returns the records sent. Raises on a failure
        that may pass (nothing after it is sent before it)."""
        before = self.sent
        try:
            progressed = True
            while progressed:  # a stream unblocked by another is taken again
                progressed = False
                for stream in outbox.streams(self.root):
                    if self._send_stream(stream):
                        progressed = True
        finally:
            pending = outbox.pending(self.root)
            if pending != self._pending and self.on_pending is not None:
                self._pending = pending
                self.on_pending(pending)
        return self.sent - before

    def _send_stream(self, stream: str) -> bool:
        cursor = self.state.sent.get(stream, outbox.Cursor())
        moved = False
        records = list(outbox.unsent(self.root, stream, cursor))
        last = {_replaces(r): n for n, (_, r) in enumerate(records) if _replaces(r)}
        i = 0
        while i < len(records):
            if (file := _replaces(records[i][1])) and last[file] > i:
                # a later record of this pass writes the same file of the same run
                # (the front's table and JSON after each trial): only the last is sent
                self.state.sent[stream] = records[i][0]
                self.sent += 1
                moved = True
                i += 1
                continue
            # consecutive metric/param/tag batches of one run go in one request
            j = i + 1
            while j < len(records) and _mergeable(records[i][1], records[j][1], j - i):
                j += 1
            after, first = records[j - 1][0], records[i][1]
            group = [r for _, r in records[i:j]]
            try:
                self._apply(group if len(group) > 1 else first)
            except _Blocked:
                break
            except Exception as e:
                if not _refused(e):
                    raise
                key = (stream, first["seq"])
                self._attempts[key] = self._attempts.get(key, 0) + 1
                if self._attempts[key] < REFUSED_ATTEMPTS:
                    break
                why = f"{stream}#{first['seq']} {first['op']}: {type(e).__name__}: {e}"[:500]
                log.error("MLflow refused a record, dropped: %s", why)
                self.state.dropped.append(why)
                if first["op"] == "run":
                    self.state.dead.append(first["key"])  # its later records are skipped
            self.state.sent[stream] = after
            self.state.save(self.root)
            self.sent += j - i
            moved = True
            i = j
        return moved

    def _id(self, key: str) -> str:
        if key in self.state.ids:
            return self.state.ids[key]
        raise _Blocked(key)

    def _learn(self, key: str, value: str) -> None:
        self.state.ids[key] = value
        self.state.save(self.root)
        if self.on_id is not None:
            try:
                self.on_id(key, value)
            except Exception:  # the id is in the state; the job store is told later
                log.exception("could not record MLflow id of %s", key)

    def _apply(self, rec: dict[str, Any] | list[dict[str, Any]]) -> None:
        if isinstance(rec, list):
            return self._batch(rec)
        op = rec["op"]
        run = str(rec.get("run"))
        if run in self.state.dead:
            return  # its run was deleted or refused: nothing to send for it
        if op == "experiment":
            self._experiment(rec)
        elif op == "run":
            self._create_run(rec)
        elif op == "batch":
            self._batch([rec])
        elif op == "dict":
            self.c.log_dict(self._id(run), rec["obj"], rec["file"])
        elif op == "table":
            import pandas as pd

            replace_table(self.c, self._id(run), pd.DataFrame(rec["rows"]), rec["file"])
        elif op == "artifact":
            self.c.log_artifact(self._id(run), rec["path"], rec["folder"])
        elif op == "artifacts":
            if Path(rec["dir"]).is_dir():
                self.c.log_artifacts(self._id(run), rec["dir"], rec["folder"])
        elif op == "status":
            if rec["status"] == "RUNNING":
                self.c.update_run(self._id(run), status="RUNNING")
            else:
                self.c.set_terminated(self._id(run), rec["status"])
        elif op == "register":
            self._register(rec)
        elif op == "delete":
            if run in self.state.ids:
                self.c.delete_run(self.state.ids[run])
            self.state.dead.append(run)
        else:
            raise ValueError(f"unknown outbox op {op!r}")
        return None

    def _experiment(self, rec: dict[str, Any]) -> None:
        if rec["key"] in self.state.ids:
            return
        exp = self.c.get_experiment_by_name(rec["name"])
        if exp is None:
            try:
                exp_id = str(self.c.create_experiment(rec["name"]))
            except Exception:  # another job created it between our two calls
                exp = self.c.get_experiment_by_name(rec["name"])
                if exp is None:
                    raise
                exp_id = str(exp.experiment_id)
        else:
            exp_id = str(exp.experiment_id)
        self._learn(rec["key"], exp_id)

    def _create_run(self, rec: dict[str, Any]) -> None:
        key = rec["key"]
        if key in self.state.ids or key in self.state.dead:
            return  # created before (a resumed driver or trial says it again), or deleted
        exp_id = self._id(EXPERIMENT)
        tags = {**rec["tags"], KEY_TAG: key}
        if rec.get("parent"):
            tags[PARENT_TAG] = self._id(rec["parent"])
        # an earlier sender may have created it and died before saving that: find it
        # (keys are a job's own: ``parent`` in every job, so the job's id is matched too)
        where = f"tags.`{KEY_TAG}` = '{key}'"
        if "sparq.job_id" in tags:
            where += f" and tags.`sparq.job_id` = '{tags['sparq.job_id']}'"
        found = self.c.search_runs([exp_id], filter_string=where, max_results=1)
        if found:
            self._learn(key, found[0].info.run_id)
            return
        self._learn(key, self.c.create_run(exp_id, run_name=rec["name"], tags=tags).info.run_id)

    def _batch(self, recs: list[dict[str, Any]]) -> None:
        run = recs[0]["run"]
        if run in self.state.dead:
            return
        from mlflow.entities import Metric, Param, RunTag

        metrics = [Metric(k, v, ts, step) for r in recs for k, v, ts, step in r.get("metrics", [])]
        # one value per key in a request (MLflow refuses a key twice, even with one value)
        params = [
            Param(k, v)
            for k, v in {k: v for r in recs for k, v in r.get("params", {}).items()}.items()
        ]
        tags = {k: v for r in recs for k, v in r.get("tags", {}).items()}
        run_id = self._id(run)
        log_batches(self.c, run_id, metrics, params)
        if tags:
            self.c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _register(self, rec: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        run_id = self._id(rec["run"])
        name = rec["name"]
        try:
            self.c.create_registered_model(name, description=rec["description"])
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = [
            mv
            for mv in self.c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            if mv.tags.get(KEY_TAG) == rec["key"]
        ]
        mv = found[0] if found else None
        if mv is None:
            mv = self.c.create_model_version(
                name,
                source=f"runs:/{run_id}/{rec['artifact_path']}",
                run_id=run_id,
                tags={**rec["tags"], KEY_TAG: rec["key"]},
                description=rec["description"],
            )
        self.c.set_registered_model_alias(name, "best", mv.version)
        self._learn(rec["key"], str(mv.version))


def _replaces(rec: dict[str, Any]) -> tuple[str, str] | None:
    """``(run, file)`` for a record that overwrites one artifact file of a run."""
    if rec.get("op") in ("dict", "table"):
        return str(rec.get("run")), str(rec.get("file"))
    return None


def _mergeable(first: dict[str, Any], rec: dict[str, Any], n: int) -> bool:
    """Whether ``rec`` can join ``first``'s request (batches of one run, bounded)."""
    return first["op"] == rec["op"] == "batch" and rec["run"] == first["run"] and n < 50
