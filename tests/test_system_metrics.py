"""MLflow system metrics around a training job: sampled into the run, nothing left running."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest

from dpoflow.tasks.system_metrics import system_metrics


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_system_metrics_are_sampled_into_the_run_and_the_thread_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sys")).info.run_id

    with system_metrics(uri, run_id):
        assert len(monitor_threads()) == 1
        time.sleep(2.0)
    assert monitor_threads() == []
    metrics = client.get_run(run_id).data.metrics
    print(sorted(metrics))
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/{name}" in metrics
    steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2

    # A failed job stops the sampling too; a retry goes on from the steps already logged.
    with pytest.raises(RuntimeError), system_metrics(uri, run_id):
        time.sleep(1.0)
        raise RuntimeError("the training job died")
    assert monitor_threads() == []
    again = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(again) > len(steps) and len(set(again)) == len(again)  # no step logged twice


def test_a_retry_after_the_model_finished_reuses_it_instead_of_training_again(
    tmp_path, monkeypatch
):
    """Training ended and wrote model/result.json, then the attempt failed after it (the
    tracking server was down when the run was closed): the retry must not launch again."""
    import json

    from dpoflow.config import load_config
    from dpoflow.tasks import training

    def launched(*args, **kwargs):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr(training, "run_training", launched)
    partial = tmp_path / "stages" / "sft" / "key.partial"
    (partial / "model").mkdir(parents=True)
    finished = {"steps": 3, "resumed_from_step": 0, "final_metrics": {"loss": 1.5}, "seconds": 2}
    (partial / "model" / "result.json").write_text(json.dumps(finished))
    cfg = load_config()
    result = training.train_in_child(
        partial,
        kind="sft",
        workdir=str(tmp_path),
        section=cfg.sft.model_dump(mode="json"),
        distributed=cfg.distributed.model_dump(mode="json"),
        mlflow_cfg=cfg.mlflow.model_dump(mode="json"),
        model_path=str(tmp_path / "base"),
        data_path=str(tmp_path / "pairs.jsonl"),
        run_name="sft",
        params={},
        tags={},
    )
    assert result["final_metrics"] == {"loss": 1.5} and result["train_seconds"] == 2
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        result["mlflow_run_id"]
    )
    assert run.info.status == "FINISHED"
