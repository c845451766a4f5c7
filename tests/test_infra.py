"""The infra files, checked by structure (there is no Docker engine on test machines)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

from tests.conftest import PROJECT_ROOT

INFRA = PROJECT_ROOT / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yaml").read_text())


def env_of(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def depends_on(service: dict) -> set[str]:
    deps = service.get("depends_on") or []
    return set(deps if isinstance(deps, list) else deps.keys())


def test_compose_services_have_images_and_known_dependencies():
    services = compose()["services"]
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker"} <= set(services)
    for name, service in services.items():
        assert service.get("image"), f"{name} has no image"
        assert depends_on(service) <= set(services), name
        for build in [service.get("build")] if service.get("build") else []:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file(), name
    assert {"postgres"} <= depends_on(services["prefect-server"])
    assert {"postgres", "minio-bucket"} <= depends_on(services["mlflow"])
    assert {"prefect-server", "mlflow"} <= depends_on(services["worker"])


def test_compose_services_point_at_each_other():
    services = compose()["services"]
    prefect_db = urlparse(env_of(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert prefect_db.scheme == "postgresql+asyncpg" and prefect_db.hostname == "postgres"
    assert prefect_db.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]

    mlflow_cmd = services["mlflow"]["command"]
    backend = urlparse(re.search(r"--backend-store-uri (\S+)", mlflow_cmd).group(1))
    assert backend.scheme == "postgresql+psycopg2" and backend.hostname == "postgres"
    assert f"CREATE DATABASE {backend.path[1:]}" in (INFRA / "postgres-init.sql").read_text()
    assert "--artifacts-destination s3://mlflow" in mlflow_cmd
    assert urlparse(env_of(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"

    worker = env_of(services["worker"])
    api = urlparse(worker["PREFECT_API_URL"])
    assert (api.hostname, str(api.port)) == ("prefect-server", "4200")
    assert "--port 4200" in services["prefect-server"]["command"]
    tracking = urlparse(worker["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, str(tracking.port)) == ("mlflow", "5000")
    assert "--port 5000" in mlflow_cmd
    assert "--pool dpoflow" in services["worker"]["command"]


def test_compose_serve_follows_the_registry_and_publishes_its_port():
    services = compose()["services"]
    serve, worker = services["serve"], env_of(services["worker"])
    command = serve["command"].split()
    assert command[:2] == ["dpoflow", "serve"] and "--poll-seconds" in command
    port = command[command.index("--port") + 1]
    assert f"{port}:{port}" in serve["ports"] and command[command.index("--host") + 1] == "0.0.0.0"
    assert f"127.0.0.1:{port}/health" in " ".join(serve["healthcheck"]["test"])
    # The same registry and sign-in as the worker that promotes.
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env_of(serve)[key] == worker[key], key
    assert "mlflow" in depends_on(serve)


def test_prefect_yaml_deployments_name_real_flows_and_schedules():
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        tree = ast.parse((PROJECT_ROOT / path).read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert deployment["work_pool"]["name"] == "dpoflow"
        assert all(len(s["cron"].split()) == 5 for s in deployment["schedules"])
        assert "config" in deployment["parameters"]


def test_hostfile_example_is_deepspeed_shaped():
    lines = [
        line
        for line in Path(INFRA / "hostfile.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines and all(re.fullmatch(r"\S+ slots=\d+", line) for line in lines)


# ---------------------------------------------------------------- secrets and authentication

# The variables that hold a credential; none may have a default in the compose file.
SECRETS = {
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_SECRET_KEY",
    "PREFECT_AUTH_STRING",
}
# Where each service reads a credential (service -> environment keys).
NEEDS_SECRET = {
    "postgres": ["POSTGRES_PASSWORD"],
    "minio": ["MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"],
    "minio-bucket": ["MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"],
    "prefect-server": ["PREFECT_SERVER_API_AUTH_STRING", "PGPASSWORD"],
    "mlflow": [
        "PGPASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ],
    "worker": ["PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD"],
    "serve": ["MLFLOW_TRACKING_PASSWORD"],
}
# A compose interpolation (`$${...}` is a literal `${...}` for the container's shell).
INTERPOLATION = re.compile(r"(?<!\$)\$\{(\w+)([^}]*)\}")
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")


def required_variable(value: str) -> str:
    """The variable a value requires with `${VAR:?message}` (the test fails if there is none)."""
    match = REQUIRED.search(value)
    assert match, f"{value!r} does not take its secret from a required ${{VAR:?message}}"
    return match.group(1)


def test_compose_secrets_have_no_defaults():
    text = (INFRA / "docker-compose.yaml").read_text()
    used = {}
    for name, modifier in INTERPOLATION.findall(text):
        used.setdefault(name, set()).add(modifier[:2])
    assert SECRETS <= set(used), f"secrets not used: {SECRETS - set(used)}"
    for name in SECRETS:
        assert used[name] == {":?"}, f"${{{name}}} must be ${{{name}:?message}}, not {used[name]}"
    # Nothing that looks like a credential is written into the file as a literal either.
    services = compose()["services"]
    for service, keys in NEEDS_SECRET.items():
        env = env_of(services[service])
        for key in keys:
            assert required_variable(env[key]) in SECRETS, (service, key)


def test_compose_clients_use_the_servers_credentials():
    services = compose()["services"]
    mlflow, prefect, worker = (
        env_of(services[name]) for name in ("mlflow", "prefect-server", "worker")
    )
    # The worker signs in as the MLflow admin that the server creates on its first start.
    assert worker["MLFLOW_TRACKING_USERNAME"] == mlflow["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert required_variable(worker["MLFLOW_TRACKING_PASSWORD"]) == required_variable(
        mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]
    )
    # Every Prefect client (anything given PREFECT_API_URL) sends the server's auth string.
    server_auth = required_variable(prefect["PREFECT_SERVER_API_AUTH_STRING"])
    clients = [name for name, s in services.items() if "PREFECT_API_URL" in env_of(s)]
    assert "worker" in clients
    for name in clients:
        env = env_of(services[name])
        assert required_variable(env.get("PREFECT_API_AUTH_STRING", "")) == server_auth, name


def test_compose_setting_names_are_the_ones_the_servers_read(monkeypatch):
    """The names are checked against the installed Prefect and MLflow, not remembered."""
    import mlflow.environment_variables as mlflow_env
    from prefect.settings import Settings

    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "server:secret")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "client:secret")
    settings = Settings()
    assert settings.server.api.auth_string.get_secret_value() == "server:secret"
    assert settings.api.auth_string.get_secret_value() == "client:secret"
    services = compose()["services"]
    for service in ("mlflow", "worker"):
        for key in env_of(services[service]):
            if key.startswith("MLFLOW_") and key != "MLFLOW_S3_ENDPOINT_URL":
                assert hasattr(mlflow_env, key), f"{service}: MLflow reads no {key}"


def test_mlflow_runs_the_basic_auth_app_with_no_credentials_in_files():
    import configparser

    service = compose()["services"]["mlflow"]
    command = service["command"]
    assert re.search(r"--app-name basic-auth\b", command)
    backend = urlparse(re.search(r"--backend-store-uri (\S+)", command).group(1))
    prefect_db = env_of(compose()["services"]["prefect-server"])[
        "PREFECT_API_DATABASE_CONNECTION_URL"
    ]
    # The database password is in PGPASSWORD, never in a URL that a log or `ps` may show.
    assert backend.password is None and urlparse(prefect_db).password is None
    # The auth config is mounted where MLFLOW_AUTH_CONFIG_PATH points, and keeps no password.
    config_path = env_of(service)["MLFLOW_AUTH_CONFIG_PATH"]
    mounts = dict(v.removesuffix(":ro").split(":", 1)[::-1] for v in service["volumes"])
    config = configparser.ConfigParser()
    assert config.read(INFRA / mounts[config_path])
    assert "admin_password" not in config["mlflow"]
    # Its user store is on a named volume, so users survive a new container.
    store = config["mlflow"]["database_uri"].removeprefix("sqlite:///")
    volumes = {path: name for path, name in mounts.items() if name in compose()["volumes"]}
    assert any(store.startswith(path + "/") for path in volumes), store
    # The image has the basic-auth app's extra dependencies (Flask-WTF).
    dockerfile = (INFRA / service["build"]["context"] / service["build"]["dockerfile"]).read_text()
    assert "mlflow[auth]" in dockerfile


# ---------------------------------------------------------------- the worker image


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: the last pattern matching the path or one of
    its parent folders decides (`!` re-includes); a leading `**/` matches at any depth."""
    from fnmatch import fnmatchcase

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        alternatives = [pattern, pattern.removeprefix("**/")]
        if any(fnmatchcase(p, alt) for p in prefixes for alt in alternatives):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_worker_image():
    build = compose()["services"]["worker"]["build"]
    context = (INFRA / build["context"]).resolve()
    assert "COPY . ." in (context / build["dockerfile"]).read_text()
    lines = (context / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in [
        ".venv/bin/python",
        ".dpoflow/mlflow.db",
        ".dpoflow/runs/sft/checkpoints/latest",
        ".env",
        "infra/.env",
        ".env.local",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "benchmarks/mlruns/0/meta.yaml",
    ]:
        assert dockerignored(path, patterns), f"{path} would be copied into the worker image"
    # What `pip install -e .` needs is still copied.
    for path in ["pyproject.toml", "constraints.txt", "core/config.py", "infra/deepspeed"]:
        assert not dockerignored(path, patterns), f"{path} would be left out of the image"
