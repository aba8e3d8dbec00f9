"""Weights a job's baseline may start from (``baseline.weights``): an upload the
service keeps (``POST /v1/weights``, an id owned by its principal) or a file under
``SPARQ_WEIGHTS_DIRS`` (real path checked, symlinks resolved). Never any other path
on the server: that once read any ``.pt`` there, other jobs' baselines included.

Uploads are files ``SPARQ_HOME/weights/<id>.<ext>`` with a JSON sidecar ``<id>.json``
(owner, sha256, size, time, filename): no table of their own in the job store. No
torch here (the API imports this); whether a file holds a state dict is
``workers.jobs.baseline.read_state_dict``'s to say, the loader the baseline task uses.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.spec import WEIGHT_SUFFIXES, WEIGHTS_ID
from workers.errors import SpecError

__all__ = ["WEIGHTS_ID", "WEIGHT_SUFFIXES", "Refused", "Roots", "check", "forget", "keep"]
UNKNOWN_ID = "no uploaded weights with this id are yours (POST /v1/weights gives ids)"


class Refused(SpecError):
    """``baseline.weights`` names nothing the rule allows; the message is the rule.
    Not mapped to a status: the API answers it as a 422 of that field."""


@dataclass(frozen=True)
class Roots:
    """Where weights may be read from: uploads in ``home/weights``, and the operator's
    ``SPARQ_WEIGHTS_DIRS``. Plain data, so the driver hands it to the baseline task."""

    home: str
    dirs: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Any) -> Roots:
        return cls(str(settings.home), tuple(str(d) for d in settings.weights_dirs))

    @property
    def uploads(self) -> Path:
        return Path(self.home) / "weights"


def new_id() -> str:
    return "w-" + secrets.token_hex(8)


def read_meta(roots: Roots, weights_id: str) -> dict[str, Any] | None:
    """An upload's sidecar, or None for an id that is not one (or not well formed)."""
    if not WEIGHTS_ID.fullmatch(weights_id):
        return None
    try:
        meta = json.loads((roots.uploads / f"{weights_id}.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _under(real: str, root: str) -> bool:
    return Path(real).is_relative_to(os.path.realpath(root))


def check(value: str, roots: Roots, principal: str | None, *, owner_checked: bool = True) -> Path:
    """The real path of the file ``value`` names if the rule allows it, else
    :class:`Refused`. An id of another principal is refused as an unknown one (who
    owns what is not told). ``owner_checked=False``: the baseline task, which re-checks
    the rest before opening (the service checked the owner at submit)."""
    if WEIGHTS_ID.fullmatch(value):
        meta = read_meta(roots, value)
        if meta is None or (owner_checked and meta.get("owner") != principal):
            raise Refused(UNKNOWN_ID)
        real = os.path.realpath(roots.uploads / str(meta.get("file", "")))
        if not _under(real, str(roots.uploads)) or not os.path.isfile(real):
            raise Refused(UNKNOWN_ID)
        return Path(real)
    real = os.path.realpath(value)
    if not any(_under(real, d) for d in roots.dirs):
        raise Refused(  # which directories those are is the operator's to tell
            "a path on the service must be under a directory of the service's "
            "SPARQ_WEIGHTS_DIRS once symlinks are resolved; upload the file instead (POST "
            "/v1/weights; `sparq submit` does it for a local file)"
        )
    if not (os.path.isfile(real) and os.access(real, os.R_OK)):
        raise Refused("no readable file at this path on the service (the workers read it too)")
    return Path(real)


def suffix_of(path: Path, filename: str | None) -> str:
    """The upload's suffix: its filename's, else ``.npz`` for a zip of ``.npy`` arrays
    (numpy's savez) and ``.pt`` for anything else (torch.save)."""
    if filename:
        return Path(filename).suffix
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return ".npz" if names and all(n.endswith(".npy") for n in names) else ".pt"
    except (OSError, zipfile.BadZipFile):
        return ".pt"


def forget(roots: Roots, meta: dict[str, Any]) -> None:
    """Remove an upload: its sidecar first, so that the id is unknown at once."""
    (roots.uploads / f"{meta['id']}.json").unlink(missing_ok=True)
    file = Path(str(meta.get("file") or "")).name
    if file:
        (roots.uploads / file).unlink(missing_ok=True)


def keep(
    roots: Roots,
    tmp: Path,
    *,
    suffix: str,
    owner: str | None,
    sha256: str,
    size_bytes: int,
    filename: str | None,
) -> dict[str, Any]:
    """Keep a checked upload under a new id: the file moved in place, then its sidecar
    written atomically (an id is known only once both are there)."""
    weights_id = new_id()
    file = f"{weights_id}{suffix}"
    tmp.replace(roots.uploads / file)
    meta = {
        "id": weights_id,
        "owner": owner,
        "sha256": sha256,
        "size_bytes": size_bytes,
        "created_at": datetime.now(UTC).isoformat(),
        "filename": filename,
        "file": file,
    }
    side = roots.uploads / f".{weights_id}.json.tmp"
    side.write_text(json.dumps(meta))
    side.replace(roots.uploads / f"{weights_id}.json")
    return meta
