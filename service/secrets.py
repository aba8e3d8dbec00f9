"""Secrets stay in the service: out of the environments of the processes it starts,
and out of every text it stores or shows.

Who needs which secret. :func:`scrub_env` removes every name of ``SECRET_VARS``;
each process that needs one gets it back by name (``keep``) or from its settings:

- ``SPARQ_API_TOKENS``: the API alone. ``SPARQ_TOKEN`` (the CLI's own token): no
  server at all.
- ``SPARQ_DATABASE_URL`` (a PostgreSQL URL holds its password): the API and the
  search drivers, whose environment sets it from the settings (``driver_env``). Not
  Ray (trials never touch the job store) nor MLflow.
- ``SPARQ_MLFLOW_BACKEND_URI``, ``MLFLOW_BACKEND_STORE_URI``: the MLflow server
  alone, which ``start_mlflow`` hands its backend URI.
- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``: the MLflow
  server alone. Artifacts are proxied: drivers and trials send them over HTTP to
  the server, which alone writes the object store.
- ``RAY_AUTH_TOKEN``: every Ray process (the head, its workers, which inherit the
  head's environment, and the drivers, which join it); not MLflow.
  ``RAY_AUTH_TOKEN_PATH`` (the stack's token in a 0600 file) is only a path.

What :func:`scrub` hides is :func:`known_secrets`: what this process can know, from
its settings and environment (the API tokens, the passwords in the job store's and
the MLflow backend's URLs, the Ray token, AWS secret keys). Each process computes its
own: a driver, which holds no API token, hides the passwords and the Ray token from
what it stores; the API hides the API tokens too from what it shows, so a token that
user code found anyway (the service's ``/proc/PID/environ`` is readable by the same
user) and a driver stored is not shown.

Not covered: user code runs as the service's user, so it can still read what that
user can (the service's memory and environment, the job store through the driver's
URL) and write it anywhere but the job store's texts; only another user or a
container for user code would stop that.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from service.settings import Settings

API_ONLY = ("SPARQ_API_TOKENS", "SPARQ_TOKEN")
JOB_STORE = ("SPARQ_DATABASE_URL",)
MLFLOW_BACKEND = ("SPARQ_MLFLOW_BACKEND_URI", "MLFLOW_BACKEND_STORE_URI")
OBJECT_STORE = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
RAY_AUTH = ("RAY_AUTH_TOKEN",)
SECRET_VARS = frozenset(API_ONLY + JOB_STORE + MLFLOW_BACKEND + OBJECT_STORE + RAY_AUTH)
HIDDEN = "***"
# variables whose value is a secret (an access key id names a key, it is no secret)
_SECRET_VALUES = ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def scrub_env(env: Mapping[str, str], keep: Collection[str] = ()) -> dict[str, str]:
    """``env`` without the secrets of ``SECRET_VARS`` but those named in ``keep``."""
    return {k: v for k, v in env.items() if k not in SECRET_VARS or k in keep}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***`` (longest first, so a secret that
    contains another is hidden whole)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, HIDDEN)
    return text


def url_password(url: str | None) -> set[str]:
    """The password in a URL (``postgresql://user:PASSWORD@host/db``) as written and
    decoded; none if it has none."""
    if not url:
        return set()
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL (a path)
        return set()
    if not password:
        return set()
    return {password, unquote(password), quote(unquote(password), safe="")}


def known_secrets(settings: Settings, env: Mapping[str, str] = os.environ) -> frozenset[str]:
    """Every secret value this process can know (see the module's docstring)."""
    found = set(settings.principals)
    found |= url_password(settings.db_url) | url_password(settings.mlflow_backend_uri)
    found |= {env[k] for k in _SECRET_VALUES if env.get(k)}
    if path := env.get("RAY_AUTH_TOKEN_PATH"):
        try:
            found.add(Path(path).read_text().strip())
        except OSError:  # not there (yet): nothing to hide
            pass
    return frozenset(s for s in found if s)
