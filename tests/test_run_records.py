"""The pieces of what a run and a model version show in MLflow, without a pipeline run
(the end-to-end view is `test_pipeline_e2e.test_mlflow_shows_what_a_user_looks_for`)."""

from __future__ import annotations

import json

from dpoflow.tasks.curves import training_curves
from dpoflow.tasks.lineage import version_description


def test_training_curves_draw_the_panels_the_run_has(tmp_path):
    rows = [
        {"step": s, "loss": 1 / s, "grad_norm": 2.0, "learning_rate": 1e-3} for s in range(1, 6)
    ]
    rows[-1]["eval/loss"] = 0.3  # held-out points are drawn on the training loss's panel
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    png = training_curves(metrics, tmp_path / "curves.png", "sft")

    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert training_curves(tmp_path / "none.jsonl", tmp_path / "empty.png", "sft") is None
    assert not (tmp_path / "empty.png").exists()


def test_version_description_holds_the_decision_and_its_whole_reason():
    tags = {
        "beta": "0.1",
        "loss_type": "ipo",
        "win_rate": "0.8120",
        "win_rate_ci": "[0.7000, 0.8890]",
        "judge": "vader",
    }
    assert "not decided yet" in version_description(tags)
    reason = "win rate vs reference (95% CI 0.700-0.889); " + "head-to-head " * 600
    text = version_description(
        tags | {"promotion.decision": "champion", "promotion.reason": reason}
    )
    assert "β=0.1" in text and "ipo" in text and "0.812" in text and "0.700-0.889" in text
    assert "Promotion: champion" in text and reason in text
