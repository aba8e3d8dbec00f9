"""Weights without server paths: uploads (``POST /v1/weights``) owned by their
principal, server paths only under SPARQ_WEIGHTS_DIRS, and ``sparq submit`` uploading
a local file for the user."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service import weights as wt
from service.api import create_app
from service.cli import upload_local_weights
from service.client import Client
from service.launcher import driver_env
from service.settings import Settings
from service.weights import Roots

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
AS_ALICE = {"Authorization": f"Bearer {ALICE}"}
AS_BOB = {"Authorization": f"Bearer {BOB}"}
MINIMAL = {"model": {"builtin": "digits-mlp"}, "dataset": {"builtin": "digits"}}
LIMIT = 64 << 10


class Custom:
    """Not a tensor: torch.load(weights_only=True) must refuse to build it."""

    def __init__(self) -> None:
        self.x = 1


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _linear() -> bytes:
    return _saved(torch.nn.Linear(4, 2).state_dict())


@pytest.fixture
def conf(settings: Settings, tmp_path: Path) -> Settings:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return settings.model_copy(
        update={
            "api_tokens": [f"alice:{ALICE}", f"bob:{BOB}"],
            "weights_dirs": [allowed],
            "max_weights_bytes": LIMIT,
        }
    )


@pytest.fixture
def client(conf: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(conf, launch=False), raise_server_exceptions=False) as c:
        yield c


def _upload(
    client: TestClient, data: bytes, headers: dict[str, str] = AS_ALICE, **params: str
) -> httpx.Response:
    return client.post(
        "/v1/weights",
        content=data,
        params=params,
        headers={**headers, "content-type": "application/octet-stream"},
    )


def _submit(client: TestClient, weights: str, headers: dict[str, str] = AS_ALICE):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs", json={**MINIMAL, "baseline": {"weights": weights}}, headers=headers
    )


def _left(conf: Settings) -> list[str]:
    uploads = conf.home / "weights"
    return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []


def test_an_upload_is_a_weights_id_its_owner_submits_with(
    client: TestClient, conf: Settings
) -> None:
    data = _linear()
    r = _upload(client, data, filename="linear.pt")
    assert r.status_code == 201, r.text
    up = r.json()
    assert wt.WEIGHTS_ID.fullmatch(up["id"])
    assert up["size_bytes"] == len(data)
    assert up["filename"] == "linear.pt"
    assert _left(conf) == [f"{up['id']}.json", f"{up['id']}.pt"]  # no temp file behind
    assert client.get(f"/v1/weights/{up['id']}", headers=AS_ALICE).json() == up
    r = _submit(client, up["id"])
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["baseline"]["weights"] == up["id"]


def test_another_principal_cannot_tell_an_id_exists(client: TestClient) -> None:
    up = _upload(client, _linear()).json()
    theirs, unknown = _submit(client, up["id"], AS_BOB), _submit(client, "w-" + "0" * 16, AS_BOB)
    assert theirs.status_code == unknown.status_code == 422
    [d] = theirs.json()["detail"]
    assert d["field"] == "baseline.weights"
    assert d["value"] == up["id"]
    assert d["rule"] == unknown.json()["detail"][0]["rule"] == wt.UNKNOWN_ID
    assert client.get(f"/v1/weights/{up['id']}", headers=AS_BOB).status_code == 404
    r = client.get("/v1/weights/w-" + "0" * 16, headers=AS_ALICE)
    assert r.status_code == 404
    assert "of yours" in r.json()["message"]
    assert client.get("/v1/jobs", headers=AS_BOB).json()["jobs"] == []


def test_an_upload_needs_a_token(client: TestClient, conf: Settings) -> None:
    assert _upload(client, _linear(), headers={}).status_code == 401
    assert _left(conf) == []


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(
    client: TestClient, conf: Settings
) -> None:
    big = b"\0" * (LIMIT + 1)
    r = _upload(client, big)  # Content-Length says so: refused before the route
    assert r.status_code == 413
    assert r.json() == {
        "message": f"request body is larger than the limit of {LIMIT} bytes "
        "(SPARQ_MAX_WEIGHTS_BYTES)",
        "limit_bytes": LIMIT,
    }

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it is written
        for _ in range(LIMIT // 4096 + 1):
            yield b"\0" * 4096

    r = _upload(client, chunked())  # type: ignore[arg-type]
    assert r.status_code == 413
    assert r.json()["limit_bytes"] == LIMIT
    assert _left(conf) == []


def test_an_upload_larger_than_a_job_spec_is_fine(client: TestClient, conf: Settings) -> None:
    """The upload's limit is SPARQ_MAX_WEIGHTS_BYTES, not SPARQ_MAX_REQUEST_BYTES."""
    small = conf.model_copy(update={"max_request_bytes": 1024})
    with TestClient(create_app(small, launch=False)) as c:
        data = _saved({"w": torch.zeros(1024)})
        assert len(data) > 1024
        assert _upload(c, data).status_code == 201
        assert c.post("/v1/jobs", content=b"x" * 2048, headers=AS_ALICE).status_code == 413


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (_saved({"x": Custom()}), "torch.load(weights_only=True) refused it"),
        (_saved({"lr": 0.1}), "mapping of parameter names to tensors"),
        (_saved({}), "not nothing"),
        (b"not weights at all", "cannot be read as a state dict"),
        (b"", "body is empty"),
    ],
    ids=["custom-class", "no-tensors", "empty-dict", "junk", "no-body"],
)
def test_an_upload_that_is_not_a_state_dict_is_422_and_leaves_nothing(
    client: TestClient, conf: Settings, data: bytes, rule: str
) -> None:
    r = _upload(client, data)
    assert r.status_code == 422, r.text
    [d] = r.json()["detail"]
    assert d["field"] == "body"
    assert rule in d["rule"]
    assert _left(conf) == []


def test_an_npz_upload_is_sniffed_without_a_filename(client: TestClient, conf: Settings) -> None:
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, weight=np.zeros((2, 4), np.float32))
    up = _upload(client, buf.getvalue()).json()
    assert _left(conf) == [f"{up['id']}.json", f"{up['id']}.npz"]
    assert _upload(client, buf.getvalue(), filename="../x.npz").status_code == 422


def test_a_server_path_only_under_weights_dirs(
    client: TestClient, conf: Settings, tmp_path: Path
) -> None:
    allowed = conf.weights_dirs[0]
    (allowed / "w.pt").write_bytes(_linear())
    assert _submit(client, str(allowed / "w.pt")).status_code == 201
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "w.pt").write_bytes(_linear())
    (allowed / "link.pt").symlink_to(outside / "w.pt")
    job = conf.job_dir("j-other")  # another job's baseline, the reported hole
    job.mkdir(parents=True)
    (job / "w.npz").write_bytes(b"")
    for path in (
        outside / "w.pt",
        allowed / "link.pt",  # inside by name, outside once resolved
        allowed / ".." / "elsewhere" / "w.pt",
        job / "w.npz",
    ):
        r = _submit(client, str(path))
        assert r.status_code == 422, path
        [d] = r.json()["detail"]
        assert d["field"] == "baseline.weights"
        assert d["value"] == str(path)
        assert "SPARQ_WEIGHTS_DIRS" in d["rule"]
        assert str(allowed) not in d["rule"]  # where they are is not told
    assert len(client.get("/v1/jobs", headers=AS_ALICE).json()["jobs"]) == 1


def test_submit_uploads_a_local_file_and_names_it_by_id(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(_linear())
    api = Client("http://testserver")
    api.http = client  # the real app, over its test transport
    client.headers.update(AS_ALICE)
    spec = {**MINIMAL, "baseline": {"weights": "model.pt", "epochs": 1}}
    sent = upload_local_weights(api, spec, tmp_path)  # relative: to the spec's directory
    weights_id = sent["baseline"]["weights"]
    assert wt.WEIGHTS_ID.fullmatch(weights_id)
    assert sent["baseline"]["epochs"] == 1
    assert spec["baseline"]["weights"] == "model.pt"  # the caller's copy untouched
    assert api.weights(weights_id)["filename"] == "model.pt"
    assert api.submit(sent)["spec"]["baseline"]["weights"] == weights_id
    # an id, or a path that is not a local file, is the service's to judge
    for left in (weights_id, "/srv/weights/not-here.pt"):
        same = {**MINIMAL, "baseline": {"weights": left}}
        assert upload_local_weights(api, same, tmp_path) is same


def test_the_driver_hands_the_baseline_task_the_services_roots(
    conf: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's settings come from driver_env: the same roots as the service's,
    whatever the service's own environment said (settings from code included)."""
    monkeypatch.setenv("SPARQ_WEIGHTS_DIRS", "/somewhere/else")
    env = driver_env(conf)
    for var in ("SPARQ_HOME", "SPARQ_WEIGHTS_DIRS"):
        monkeypatch.setenv(var, env[var])
    assert Roots.of(Settings()) == Roots.of(conf)


def test_sparq_submit_says_what_it_uploaded(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml
    from typer.testing import CliRunner

    from service import cli

    api = Client("http://testserver")
    api.http = client
    client.headers.update(AS_ALICE)
    monkeypatch.setattr(cli, "_client", lambda url, token: api)
    (tmp_path / "model.pt").write_bytes(_linear())
    spec = {**MINIMAL, "baseline": {"weights": "model.pt"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(cli.app, ["submit", str(tmp_path / "job.yaml")])
    assert r.exit_code == 0, r.output
    [line] = [ln for ln in r.output.splitlines() if ln.startswith("uploaded")]
    assert str(tmp_path / "model.pt") in line
    assert "as weights w-" in line
    job = client.get("/v1/jobs").json()["jobs"][0]
    assert wt.WEIGHTS_ID.fullmatch(
        client.get(f"/v1/jobs/{job['id']}").json()["spec"]["baseline"]["weights"]
    )
    r = CliRunner().invoke(cli.app, ["submit", "--no-upload", str(tmp_path / "job.yaml")])
    assert r.exit_code == 2  # a relative path, sent as it is: the service refuses it
    assert "absolute path" in r.output


def test_an_owner_deletes_an_upload_and_then_it_is_unknown(
    client: TestClient, conf: Settings
) -> None:
    up = _upload(client, _linear()).json()
    assert client.delete(f"/v1/weights/{up['id']}", headers=AS_BOB).status_code == 404
    assert len(_left(conf)) == 2
    r = client.delete(f"/v1/weights/{up['id']}", headers=AS_ALICE)
    assert r.status_code == 200
    assert r.json() == up
    assert _left(conf) == []
    assert client.delete(f"/v1/weights/{up['id']}", headers=AS_ALICE).status_code == 404
    assert _submit(client, up["id"]).json()["detail"][0]["rule"] == wt.UNKNOWN_ID
