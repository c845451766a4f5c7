"""The β sweep: argument parsing and the frontier report (fast), then one real sweep."""

from __future__ import annotations

import json
import shutil

import pytest

from dpoflow.config import load_config
from dpoflow.errors import ConfigError
from dpoflow.flows.sweep import child_configs, parse_list
from dpoflow.tasks.sweep_report import children_rows, draw_frontier, frontier_figure
from tests.conftest import SMALL, copy_stages, run_cli


def child_summary(beta: float, loss_type: str, kl: float, reward: float) -> dict:
    return {
        "beta": beta,
        "loss_type": loss_type,
        "win_rate": 0.6,
        "win_rate_ci": [0.5, 0.7],
        "reward_policy": reward,
        "reward_reference": 0.1,
        "kl": kl,
        "mlflow_run_id": f"run-{loss_type}-{beta}",
        "registered_model": {"version": "1"},
    }


def test_parse_list_and_child_configs_refuse_bad_values_before_running():
    assert parse_list("0.05, 0.1,0.1,", "--betas", float) == [0.05, 0.1]
    with pytest.raises(ConfigError, match="--betas 'a' is not"):
        parse_list("a", "--betas", float)
    with pytest.raises(ConfigError, match="--betas is empty"):
        parse_list(" , ", "--betas", float)
    cfg = load_config()
    children = child_configs(cfg, [0.1, 0.5], ["sigmoid", "ipo"])
    assert [(c["dpo"]["loss_type"], c["dpo"]["beta"]) for c in children] == [
        ("sigmoid", 0.1),
        ("sigmoid", 0.5),
        ("ipo", 0.1),
        ("ipo", 0.5),
    ]
    assert all(c["sft"] == children[0]["sft"] for c in children)  # one SFT for all
    with pytest.raises(ConfigError, match="dpo.beta"):
        child_configs(cfg, [0.1, -1.0], ["sigmoid"])
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        child_configs(cfg, [0.1], ["dpo-typo"])


def test_frontier_figure_is_a_png_with_one_point_per_child(tmp_path):
    summaries = [
        child_summary(beta, loss, kl, reward)
        for loss in ("sigmoid", "ipo")
        for beta, kl, reward in ((0.1, 5.0, 0.6), (0.5, 1.0, 0.3))
    ]
    rows = children_rows(summaries)
    assert [r["beta"] for r in rows] == [0.1, 0.5, 0.1, 0.5]
    assert rows[0]["win_rate_low"] == 0.5 and rows[0]["mlflow_run_id"] == "run-sigmoid-0.1"
    path = frontier_figure(rows, tmp_path / "plots" / "frontier.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What is drawn: on the frontier, one line per loss type with one point per child at
    # that child's (KL, reward), in KL order; on the right, win rate at each β.
    frontier, by_beta = draw_frontier(rows).axes
    lines = {line.get_label(): line.get_xydata().tolist() for line in frontier.lines}
    for loss in ("sigmoid", "ipo"):
        mine = sorted((r for r in rows if r["loss_type"] == loss), key=lambda r: r["kl"])
        assert lines[loss] == [[r["kl"], r["reward_policy"]] for r in mine]
    labels = sorted(text.get_text() for text in frontier.texts)
    assert labels == ["β=0.1", "β=0.1", "β=0.5", "β=0.5"]
    drawn = {c.get_label(): c.lines[0].get_xydata().tolist() for c in by_beta.containers}
    assert sorted(map(tuple, drawn["sigmoid"] + drawn["ipo"])) == sorted(
        (r["beta"], r["win_rate"]) for r in rows
    )


@pytest.mark.slow
def test_sweep_runs_shared_stages_once_and_nests_child_runs(tmp_path, cli_env, shared_stages):
    """The one real sweep: 2 βs on the small settings. It starts from the session's trained
    SFT and reference (their run-once is the same cache) but validates afresh, so the first
    child is seen to run a shared stage and the second to reuse it."""
    copy_stages(shared_stages, tmp_path)
    shutil.rmtree(tmp_path / "stages" / "validate")
    summary_path = tmp_path / "sweep.json"
    args = ["sweep", "--betas", "0.1,0.5", "--workdir", str(tmp_path)]
    args += ["--summary-json", str(summary_path)]
    for item in SMALL:
        args += ["--set", item]
    proc = run_cli(args, cli_env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    first, second = summary["children"]
    assert (first["beta"], second["beta"]) == (0.1, 0.5)
    assert first["stages"]["validate"]["status"] == "completed"
    for shared in ("validate", "sft", "reference"):
        assert second["stages"][shared]["status"] == "cached"
    assert second["stages"]["dpo"]["status"] == "completed"
    assert "frontier.png" in proc.stdout and "0.5" in proc.stdout

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.params["sweep.betas"] == "0.1,0.5"
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/frontier.png", "sweep/children.json"} <= artifacts
    for child in summary["children"]:
        run = client.get_run(child["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert float(run.data.params["dpo.beta"]) == child["beta"]
        assert run.data.metrics["eval/win_rate"] == pytest.approx(child["win_rate"])
        # Every child carries the sweep's frontier beside its own curves.
        child_artifacts = client.list_artifacts(run.info.run_id, "sweep")
        assert "sweep/frontier.png" in {a.path for a in child_artifacts}
