"""A small HTTP client of the REST API, used by the CLI (and handy in scripts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class ClientError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
