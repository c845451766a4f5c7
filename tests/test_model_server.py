"""`mlflow models serve -m models:/<name>@champion --env-manager local` answers with text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import mlflow
import pytest

from models.serving import log_generator
from tests.servers import background, free_port
from tests.test_evaluation import save_tiny_model

pytestmark = pytest.mark.slow


def test_served_champion_answers_invocations(tmp_path, monkeypatch, cli_env):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serve", artifact_location=(tmp_path / "a").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_generator(str(save_tiny_model(tmp_path / "policy")))
        version = mlflow.register_model(info.model_uri, "served").version
        mlflow.MlflowClient().set_registered_model_alias("served", "champion", version)
    finally:
        mlflow.set_tracking_uri(None)

    port = free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow_bin, "models", "serve", "-m", "models:/served@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = cli_env | {"MLFLOW_TRACKING_URI": uri}
    request = {"dataframe_records": [{"prompt": "This movie was", "max_new_tokens": 8}]}
    with background(cmd, tmp_path / "serve.log", env, tmp_path, f"http://127.0.0.1:{port}/ping"):
        reply = httpx.post(f"http://127.0.0.1:{port}/invocations", json=request, timeout=60)

    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    print(f"\nPOST /invocations {json.dumps(request)}\n-> {reply.text}")
    assert len(predictions) == 1 and isinstance(predictions[0]["text"], str)
