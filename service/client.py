"""A small HTTP client of the REST API, used by the CLI (and handy in scripts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from workers.errors import SparqError


class ClientError(SparqError):
    """The service refused a call (``status``: its HTTP status) or could not be reached
    (``status`` 0). Client side: never raised by a route, so not in the API's table."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> Any:
        return (type(self), (self.status, str(self)))


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(
                0, f"cannot reach the sparq service at {self.http.base_url}: {e}"
            ) from e
        if r.status_code >= 400:
            try:
                msg = r.json().get("message") or r.text
            except ValueError:
                msg = r.text
            raise ClientError(r.status_code, f"HTTP {r.status_code}: {msg}")
        return r.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/jobs", json=spec))

    def upload_weights(self, path: Path) -> dict[str, Any]:
        """POST a state dict file to /v1/weights, streamed from disk; its id and sums."""
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        return dict(
            self._call(
                "POST",
                "/v1/weights",
                params={"filename": path.name},
                content=chunks(),
                headers=headers,
            )
        )

    def weights(self, weights_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/weights/{weights_id}"))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}"))

    def trials(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/jobs/{job_id}/trials"))

    def pareto(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}/pareto"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def download(self, job_id: str, out: Path, trial_id: str | None = None) -> Path:
        path = f"/v1/jobs/{job_id}/checkpoint"
        if trial_id:
            path = f"/v1/jobs/{job_id}/trials/{trial_id}/checkpoint"
        with self.http.stream("GET", path) as r:
            if r.status_code >= 400:
                r.read()
                raise ClientError(r.status_code, f"HTTP {r.status_code}: {r.json().get('message')}")
            tmp = out.with_suffix(out.suffix + ".part")
            with tmp.open("wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
            tmp.replace(out)
        return out
