"""Static checks of docker/: the compose file, the two Dockerfiles and the service
entrypoint. No Docker engine is needed; `docker compose config` runs only where
the compose client is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
DOCKERFILES = {"service": DOCKER / "service.Dockerfile", "worker": DOCKER / "worker.Dockerfile"}

SERVICES = {"postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker", "sparq"}
RAY_NODES = ("sparq", "ray-head", "ray-worker")
# Values for the variables compose must refuse to start without.
SECRETS = {
    "SPARQ_API_TOKENS": "tok-0123456789abcdef,tok-fedcba9876543210",
    "RAY_AUTH_TOKEN": "ray-0123456789abcdef0123456789abcdef",
    "POSTGRES_PASSWORD": "pg-0123456789abcdef",
    "MINIO_ROOT_USER": "sparq-minio",
    "MINIO_ROOT_PASSWORD": "minio-0123456789abcdef",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER|CREDENTIAL")
REQUIRED_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?(?P<msg>[^}]+)\}")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<password>\$\{[^}]*\}|[^@\s]+)@")
VAR_REF = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


class MissingVariable(Exception):
    pass


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?message}` and `$$`, applied to
    every string value of the parsed file (as compose does; comments are not values)."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg
        return value or ""

    return VAR_REF.sub(one, node)


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def run_index(steps: list[tuple[str, str]], pattern: str) -> int:
    found = [i for i, (kw, args) in enumerate(steps) if kw == "RUN" and re.search(pattern, args)]
    assert found, f"no RUN matches {pattern!r}"
    return found[0]


# -- compose.yaml ---------------------------------------------------------------------


def test_compose_defines_the_stack(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= SERVICES


def test_secret_like_env_is_required_from_the_environment(
    services: dict[str, dict[str, Any]],
) -> None:
    seen: set[str] = set()
    for name, service in services.items():
        for key, value in env_of(service).items():
            if SECRET_NAME.search(key):
                m = REQUIRED_REF.fullmatch(value)
                assert m, f"{name}: {key}={value!r} must be ${{VAR:?message}}"
                seen.add(m.group("name"))
    assert seen >= set(SECRETS)


def test_passwords_inside_urls_are_required_from_the_environment(compose: dict[str, Any]) -> None:
    passwords = [m.group("password") for s in strings(compose) for m in URL_PASSWORD.finditer(s)]
    assert len(passwords) >= 2  # the job store's URL and MLflow's backend store
    for password in passwords:
        assert REQUIRED_REF.fullmatch(password), f"password {password!r} in a URL"


def test_no_secret_has_a_default(compose: dict[str, Any]) -> None:
    for m in (m for s in strings(compose) for m in VAR_REF.finditer(s)):
        name, op = m.group("name"), m.group("op")
        if name and SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}}} must be ${{{name}:?message}}, not {m.group(0)}"


def test_sparq_service_points_at_the_stack(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["sparq"])
    assert env["SPARQ_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["SPARQ_DATABASE_URL"].endswith("@postgres:5432/sparq")
    assert env["SPARQ_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["SPARQ_RAY_ADDRESS"] == "ray-head:6379"
    assert env["SPARQ_API_TOKENS"].startswith("${SPARQ_API_TOKENS:?")
    assert env["SPARQ_HOME"] == "/data"


def test_dependencies_wait_on_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no"
    sparq = services["sparq"]["depends_on"]
    for dep in ("postgres", "mlflow", "ray-head"):
        assert sparq[dep]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    init = services["mlflow"]["depends_on"]["minio-init"]["condition"]
    assert init == "service_completed_successfully"
    assert "healthcheck" in services["postgres"]


def test_ray_nodes_share_sparq_home(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    sources = set()
    for name in RAY_NODES:
        mounts = [v for v in services[name].get("volumes", []) if v.split(":")[1] == "/data"]
        assert len(mounts) == 1, f"{name} mounts nothing at /data"
        sources.add(mounts[0].split(":")[0])
        if "SPARQ_HOME" in env_of(services[name]):
            assert env_of(services[name])["SPARQ_HOME"] == "/data"
    assert len(sources) == 1
    assert sources <= set(compose["volumes"])


def test_ray_processes_authenticate_with_a_shared_token(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in RAY_NODES:
        env = env_of(services[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    assert "RAY_AUTH_TOKEN" not in env_of(services["mlflow"])


def test_ray_worker_reserves_all_gpus(services: dict[str, dict[str, Any]]) -> None:
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and d["count"] == "all" and "gpu" in d["capabilities"]
        for d in devices
    )
    assert services["ray-worker"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert env_of(services["ray-worker"])["RAY_HEAD"] == "ray-head:6379"


def test_ray_head_has_no_dashboard(services: dict[str, dict[str, Any]]) -> None:
    command = services["ray-head"]["command"]
    assert command[:2] == ["ray", "start"]
    assert {"--head", "--port=6379", "--include-dashboard=false", "--block"} <= set(command)


def test_mlflow_uses_postgres_and_the_object_store(services: dict[str, dict[str, Any]]) -> None:
    mlflow = services["mlflow"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    env = env_of(mlflow)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://mlflow")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The bucket minio-init creates is the one MLflow writes to.
    assert "sparq/mlflow" in " ".join(services["minio-init"]["command"])
    # The UI has no authentication: published on loopback only.
    assert all(str(p).startswith("127.0.0.1:") for p in mlflow.get("ports", []))


def test_one_service_image_and_matching_ray_builds(services: dict[str, dict[str, Any]]) -> None:
    builds = {n: s["build"] for n, s in services.items() if "build" in s}
    service_image = {services[n]["image"] for n in ("sparq", "mlflow", "ray-head")}
    assert len(service_image) == 1
    for name in ("sparq", "mlflow", "ray-head"):
        assert builds[name]["dockerfile"] == "docker/service.Dockerfile"
    # Ray rejects nodes whose Ray or Python differs from the head's.
    for key in ("RAY_VERSION", "PYTHON_VERSION"):
        assert len({str(b["args"][key]) for b in builds.values()}) == 1, key


def test_files_compose_refers_to_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
    assert list((DOCKER / "postgres-init").glob("*.sql"))


def test_interpolates_with_the_secrets_set(compose: dict[str, Any]) -> None:
    data = interpolate(compose, dict(SECRETS))
    env = env_of(data["services"]["sparq"])
    assert env["SPARQ_API_TOKENS"] == SECRETS["SPARQ_API_TOKENS"]
    assert f":{SECRETS['POSTGRES_PASSWORD']}@postgres" in env["SPARQ_DATABASE_URL"]
    assert "${" not in yaml.safe_dump(data)


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_refuses_to_interpolate_without_a_secret(compose: dict[str, Any], missing: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    with pytest.raises(MissingVariable, match=missing):
        interpolate(compose, env)
    with pytest.raises(MissingVariable, match=missing):
        interpolate(compose, {**env, missing: ""})


# -- the Dockerfiles ------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_torch_is_installed_pinned_before_the_project(image: str) -> None:
    steps = instructions(DOCKERFILES[image])
    torch_at = run_index(steps, r"pip install\b.*\btorch==2\.13\.0\b")
    project_at = run_index(steps, r"pip install (\S+ )*\.(\s|$)")
    assert torch_at < project_at
    assert not re.search(r"pip install (\S+ )*\.(\s|$)", steps[torch_at][1])
    # Nothing installs torch unpinned or at another version.
    for kw, args in steps:
        if kw == "RUN":
            for spec in re.findall(r"\btorch[=<>!~]=?[^\s\"']*", args):
                assert spec == "torch==2.13.0", spec


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_no_wheel_source_is_named(image: str) -> None:
    steps = instructions(DOCKERFILES[image])
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    assert not re.search(r"--(extra-)?index-url|\s-i\s|https?://", runs)
    assert "pytorch.org" not in DOCKERFILES[image].read_text()
    args = {a.split("=")[0] for kw, a in steps if kw == "ARG"}
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "RAY_VERSION", "PYTHON_VERSION"} <= args


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_runs_as_a_non_root_user(image: str) -> None:
    users = [args for kw, args in instructions(DOCKERFILES[image]) if kw == "USER"]
    assert users, "no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_service_image() -> None:
    steps = instructions(DOCKERFILES["service"])
    assert steps[0] == ("ARG", "PYTHON_VERSION=3.11")
    assert ("FROM", "python:${PYTHON_VERSION}-slim") in steps
    torch_run = steps[run_index(steps, r"torch==2\.13\.0")][1]
    assert "torch.version.cuda is None" in torch_run  # the build fails on a CUDA wheel
    cmd = [args for kw, args in steps if kw == "CMD"][-1]
    assert yaml.safe_load(cmd) == [
        "uvicorn", "--factory", "service.api:app_factory", "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    assert ("ENV", "SPARQ_HOME=/data") in steps


def test_worker_image() -> None:
    steps = instructions(DOCKERFILES["worker"])
    torch_run = steps[run_index(steps, r"torch==2\.13\.0")][1]
    assert "torch.version.cuda is not None" in torch_run  # the build fails on a CPU wheel
    cmd = " ".join(yaml.safe_load([args for kw, args in steps if kw == "CMD"][-1]))
    assert re.search(r"ray start --address=\S*\$RAY_HEAD\S* --block", cmd)
    # Same base as the service image: Ray wants the same Python on every node.
    service_from = [a for kw, a in instructions(DOCKERFILES["service"]) if kw == "FROM"]
    assert [a for kw, a in steps if kw == "FROM"] == service_from


# -- the service entrypoint -----------------------------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """`ray` and `uvicorn` stand-ins that log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ray", "uvicorn"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
        script.chmod(0o755)
    return bin_dir


def run_entrypoint(
    fake_bin: Path, args: list[str], **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    base = {"PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    calls = fake_bin.parent / "calls"
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_entrypoint_is_valid_sh() -> None:
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=False).returncode == 0


def test_entrypoint_refuses_the_api_without_tokens(fake_bin: Path) -> None:
    proc, calls = run_entrypoint(fake_bin, ["uvicorn", "x"], SPARQ_RAY_ADDRESS="ray-head:6379")
    assert proc.returncode == 2
    assert "SPARQ_API_TOKENS" in proc.stderr
    assert calls == []


def test_entrypoint_joins_ray_then_serves(fake_bin: Path) -> None:
    proc, calls = run_entrypoint(
        fake_bin,
        ["uvicorn", "--factory", "service.api:app_factory"],
        SPARQ_API_TOKENS=SECRETS["SPARQ_API_TOKENS"],
        SPARQ_RAY_ADDRESS="ray-head:6379",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 2
    assert calls[0].startswith("ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0")
    assert calls[1] == "uvicorn --factory service.api:app_factory"


def test_entrypoint_joins_ray_without_the_api_secrets(fake_bin: Path) -> None:
    """The Ray node's raylet and workers inherit `ray start`'s environment: neither
    the API tokens nor the job store's URL (its password); the Ray token stays."""
    seen = fake_bin.parent / "ray-env"
    (fake_bin / "ray").write_text(f'#!/bin/sh\nenv > "{seen}"\n')
    proc, _ = run_entrypoint(
        fake_bin,
        ["uvicorn", "app"],
        SPARQ_API_TOKENS=SECRETS["SPARQ_API_TOKENS"],
        SPARQ_DATABASE_URL=f"postgresql+psycopg://sparq:{SECRETS['POSTGRES_PASSWORD']}@pg/sparq",
        RAY_AUTH_TOKEN=SECRETS["RAY_AUTH_TOKEN"],
        SPARQ_RAY_ADDRESS="ray-head:6379",
    )
    assert proc.returncode == 0, proc.stderr
    env = seen.read_text()
    assert SECRETS["SPARQ_API_TOKENS"] not in env
    assert SECRETS["POSTGRES_PASSWORD"] not in env
    assert f"RAY_AUTH_TOKEN={SECRETS['RAY_AUTH_TOKEN']}" in env


@pytest.mark.parametrize("address", ["", "ray://ray-head:10001"])
def test_entrypoint_starts_no_ray_node_without_a_cluster_address(
    fake_bin: Path, address: str
) -> None:
    proc, calls = run_entrypoint(
        fake_bin,
        ["uvicorn", "app"],
        SPARQ_API_TOKENS=SECRETS["SPARQ_API_TOKENS"],
        SPARQ_RAY_ADDRESS=address,
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == ["uvicorn app"]


def test_entrypoint_runs_other_commands_as_given(fake_bin: Path) -> None:
    # The same image runs the MLflow server and the Ray head: no token check, no join.
    proc, calls = run_entrypoint(fake_bin, ["ray", "start", "--head"])
    assert proc.returncode == 0, proc.stderr
    assert calls == ["ray start --head"]


# -- docker compose config (needs the compose client, not an engine) ----------------


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        ok = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [docker, "compose"] if ok.returncode == 0 else None


@pytest.fixture(scope="module")
def compose_client() -> list[str]:
    client = _compose_client()
    if client is None:
        pytest.skip("`docker compose` (the Compose v2 client plugin) is not installed here")
    return client


def run_compose_config(
    client: list[str], env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    empty = tmp_path / "empty.env"  # keep a local docker/.env out of it
    empty.write_text("")
    return subprocess.run(
        [*client, "--env-file", str(empty), "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_config_accepts_the_file(compose_client: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    proc = run_compose_config(compose_client, {**env, **SECRETS}, tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_docker_compose_config_needs_the_api_tokens(
    compose_client: list[str], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env.update((k, v) for k, v in SECRETS.items() if k != "SPARQ_API_TOKENS")
    proc = run_compose_config(compose_client, env, tmp_path)
    assert proc.returncode != 0
    assert "SPARQ_API_TOKENS" in proc.stderr
