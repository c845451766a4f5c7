"""`mlflow models serve -m models:/<name>@champion --env-manager local` answers with text:
the pipeline's answers, bounded by max_new_tokens, greedy at temperature 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import mlflow
import pytest

from dpoflow.models.generation import generate, load_causal_lm
from dpoflow.models.serving import log_generator
from tests.servers import background, free_port
from tests.test_evaluation import PROMPTS, save_tiny_model

pytestmark = pytest.mark.slow


def test_served_champion_answers_invocations(tmp_path, monkeypatch, ephemeral_env):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model_dir = save_tiny_model(tmp_path / "policy")
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serve", artifact_location=(tmp_path / "a").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_generator(str(model_dir))
        version = mlflow.register_model(info.model_uri, "served").version
        mlflow.MlflowClient().set_registered_model_alias("served", "champion", version)
    finally:
        mlflow.set_tracking_uri(None)

    port = free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow_bin, "models", "serve", "-m", "models:/served@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    # Only MLflow runs here: the environment of a `dpoflow` child, without a Prefect server.
    env = ephemeral_env | {"MLFLOW_TRACKING_URI": uri}

    def answers(max_new_tokens: int, temperature: float) -> list[str]:
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        request = {"dataframe_records": [{"prompt": p, **settings} for p in PROMPTS]}
        reply = httpx.post(f"http://127.0.0.1:{port}/invocations", json=request, timeout=60)
        assert reply.status_code == 200, reply.text
        print(f"\nPOST /invocations {json.dumps(request)[:120]}...\n-> {reply.text}")
        texts = [prediction["text"] for prediction in reply.json()["predictions"]]
        assert len(texts) == len(PROMPTS) and all(isinstance(text, str) for text in texts)
        return texts

    with background(cmd, tmp_path / "serve.log", env, tmp_path, f"http://127.0.0.1:{port}/ping"):
        greedy = answers(8, 0.0)
        greedy_again = answers(8, 0.0)
        sampled = answers(8, 1.0)
        short = answers(3, 0.0)

    # Text comes back, and it is the pipeline's own greedy answer to each prompt.
    assert sum(bool(text.strip()) for text in greedy) >= 3
    model, tokenizer = load_causal_lm(str(model_dir))
    assert greedy == generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0)
    # Temperature 0 is deterministic; sampling answers otherwise.
    assert greedy_again == greedy and sampled != greedy
    # At most one word per token: 3 new tokens give 3 words at most, and fewer in all than 8.
    assert all(len(text.split()) <= 3 for text in short)
    assert sum(len(t.split()) for t in short) < sum(len(t.split()) for t in greedy)
