"""The pyfunc text generator: log it to a local MLflow store, load it back, predict offline."""

from __future__ import annotations

import mlflow
import pandas as pd

from models.serving import log_generator
from tests.test_evaluation import save_tiny_model


def test_log_generator_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # keep anything MLflow writes by default inside tmp_path
    model_dir = save_tiny_model(tmp_path / "policy")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = mlflow.create_experiment(
        "serving-test", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    try:
        with mlflow.start_run(experiment_id=experiment_id):
            info = log_generator(str(model_dir), name="policy")

        loaded = mlflow.pyfunc.load_model(info.model_uri)
        prompts = pd.DataFrame({"prompt": ["this movie was", "the film"]})
        output = loaded.predict(prompts)
        assert isinstance(output, pd.DataFrame)
        assert list(output.columns) == ["text"] and len(output) == 2
        assert all(isinstance(text, str) for text in output["text"])

        greedy = prompts.assign(max_new_tokens=4, temperature=0.0)
        assert loaded.predict(greedy)["text"].tolist() == loaded.predict(greedy)["text"].tolist()
        assert loaded.metadata.get_input_schema().input_names() == [
            "prompt",
            "max_new_tokens",
            "temperature",
        ]
    finally:
        mlflow.set_tracking_uri(None)
