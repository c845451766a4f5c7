"""Stage 5: win rate of the trained policy against the reference, judged."""

from __future__ import annotations

import json
from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, dump, in_prefect_run, stage_logger, stage_task
from dpoflow.tasks.stage import write_json_atomic
from dpoflow.tasks.tracking import client, tracking_uri

JUDGED_LOG = "judged.jsonl"
EVAL_METRICS = ("win_rate", "reward_policy", "reward_reference", "kl", "kl_stderr", "unparseable")


def read_prompt_rows(path: Path, limit: int) -> list[dict]:
    """The first `limit` eval prompt rows: `prompt`, and `chosen` where the data has it."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][:limit]


def eval_metrics(result: dict) -> dict[str, float]:
    """MLflow metrics of an evaluation: `eval/...` at the main temperature, `eval/t{T}/...`
    per extra temperature, `eval/vs_chosen/...` against the dataset's chosen answers."""

    def figures(prefix: str, found: dict) -> dict[str, float]:
        out = {f"{prefix}/{k}": float(found[k]) for k in EVAL_METRICS if k in found}
        out[f"{prefix}/win_rate_ci_low"], out[f"{prefix}/win_rate_ci_high"] = found["win_rate_ci"]
        return out

    metrics = figures("eval", result)
    for temperature, found in result.get("by_temperature", {}).items():
        metrics |= figures(f"eval/t{temperature}", found)
    if result.get("vs_chosen"):
        metrics |= figures("eval/vs_chosen", result["vs_chosen"])
    return metrics


def samples_table(samples: list[dict], limit: int = 50) -> list[dict]:
    """The first samples as rows for a Prefect table artifact (texts bounded for the UI)."""
    keys = ("prompt", "policy_answer", "reference_answer")
    return [{**s, **{k: s[k][:300] for k in keys}} for s in samples[:limit]]


def log_evaluation(uri: str, run_id: str, result: dict, partial: Path) -> None:
    import mlflow
    import pandas as pd

    c = client(uri)
    for name, value in eval_metrics(result).items():
        c.log_metric(run_id, name, value)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_table(pd.DataFrame(result["samples"]), artifact_file="eval/samples.json")
        mlflow.log_artifact(str(partial / "report.md"), artifact_path="eval")


def publish_artifacts(report: str, samples: list[dict], judge: str) -> None:
    """The report and the samples as Prefect artifacts: a courtesy, never a reason to fail."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    try:
        create_markdown_artifact(key="win-rate", markdown=report, description="policy vs reference")
        create_table_artifact(
            key="eval-samples",
            table=samples_table(samples),
            description=f"policy vs reference answers, judge {judge}",
        )
    except Exception as exc:
        stage_logger().warning(
            "the win-rate and eval-samples artifacts were not published (%s)", exc
        )


@stage_task("evaluate")
def evaluate(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    from dpoflow.models.evaluation import JudgedLog, evaluate_policy, markdown_report
    from dpoflow.models.judges import make_judge

    logger = stage_logger()
    ev = section["eval"]
    dpo_manifest, sft_manifest = upstream["dpo"], upstream["sft"]

    def build(partial: Path) -> dict:
        rows = read_prompt_rows(
            Path(upstream["validate"]["path"]) / "eval_prompts.jsonl", ev["num_prompts"]
        )
        prompts = [row["prompt"] for row in rows]
        # The dataset's chosen answers, when the eval prompt file carries them.
        chosen = [row.get("chosen") for row in rows] if any("chosen" in r for r in rows) else None
        logger.info("evaluating on %d held-out prompts, judge %s", len(prompts), ev["judge"])
        # Judged chunks so far: kept in the partial folder across retries and re-runs.
        progress = JudgedLog(partial / JUDGED_LOG)
        if progress.resumed_prompts:
            logger.info(
                "resuming the evaluation: %d prompt(s) already judged", progress.resumed_prompts
            )
        result = evaluate_policy(
            str(Path(dpo_manifest["path"]) / dpo_manifest["model"]),
            str(Path(sft_manifest["path"]) / sft_manifest["model"]),
            prompts,
            make_judge(ev["judge"], ev),
            max_new_tokens=ev["max_new_tokens"],
            temperature=ev["temperature"],
            top_p=ev["top_p"],
            batch_size=ev["batch_size"],
            seed=ev["seed"],
            temperatures=ev.get("temperatures"),
            chosen=chosen,
            progress=progress,
        )
        report = markdown_report(result, title="Win rate of dpo policy")
        (partial / "report.md").write_text(report)
        with open(partial / "samples.jsonl", "w", encoding="utf-8") as f:
            for sample in result["samples"]:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        figures = {k: v for k, v in result.items() if k != "samples"}
        write_json_atomic(partial / "result.json", figures)
        log_evaluation(
            tracking_uri(section["mlflow"]["tracking_uri"], workdir),
            dpo_manifest["mlflow_run_id"],
            result,
            partial,
        )
        publish_artifacts(report, result["samples"], ev["judge"])
        low, high = result["win_rate_ci"]
        logger.info(
            "win rate %.3f [%.3f, %.3f], KL %.3f, reward %.3f vs %.3f",
            result["win_rate"],
            low,
            high,
            result["kl"],
            result["reward_policy"],
            result["reward_reference"],
        )
        # Kept until now so a retry after a failed MLflow log judges nothing again;
        # samples.jsonl holds what it held, in order.
        (partial / JUDGED_LOG).unlink()
        return {
            "judge": ev["judge"],
            "resumed_judged_prompts": progress.resumed_prompts,
            **figures,
        }

    return build_once("evaluate", key, workdir, section, upstream, build)


STAGE = Stage(
    name="evaluate",
    task=evaluate,
    reads=lambda cfg, _: {"eval": dump(cfg.eval), "mlflow": dump(cfg.mlflow)},
    inputs={
        "policy": "dpo.sha256",
        "reference": "sft.sha256",
        "prompts": "validate.prompts_sha256",
    },
)
