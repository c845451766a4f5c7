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
