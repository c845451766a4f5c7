"""Stage 5: win rate of the trained policy against the reference, judged."""

from __future__ import annotations

import json
from pathlib import Path

from dpoflow.process_gc import imports_without_collection
from dpoflow.tasks.common import Stage, build_once, dump, stage_logger, stage_task
from dpoflow.tasks.lineage import evaluation_headline, set_description
from dpoflow.tasks.stage import write_json_atomic
from dpoflow.tasks.tracking import client, flatten, log_params, tracking_uri

JUDGED_LOG = "judged.jsonl"
# In the partial folder: the MLflow run this evaluation logs into, chosen once (`evaluation_run`).
RUN_FILE = "mlflow_run_id"
# On a DPO run: how many evaluations of its weights have been logged (`evaluation_run`).
EVALUATIONS_TAG = "dpoflow.evaluations"
EVAL_METRICS = ("win_rate", "reward_policy", "reward_reference", "kl", "kl_stderr", "unparseable")
# The judges that may give no verdict (a reply without one): only they log `eval/unparseable`.
PAIRWISE_JUDGES = frozenset({"llm"})


def read_prompt_rows(path: Path, limit: int) -> list[dict]:
    """The first `limit` eval prompt rows: `prompt`, and `chosen` where the data has it."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][:limit]


def eval_metrics(result: dict, judge: str) -> dict[str, float]:
    """MLflow metrics of an evaluation: `eval/<figure>` at the main temperature (the headline
    `eval/win_rate`), `eval/<figure>_t<T>` per extra temperature, `eval/<figure>_vs_chosen`
    against the dataset's chosen answers. MLflow titles a chart with the name's last segment,
    so each of those names its figure and its condition."""
    names = [k for k in EVAL_METRICS if k != "unparseable" or judge in PAIRWISE_JUDGES]

    def figures(suffix: str, found: dict) -> dict[str, float]:
        out = {f"eval/{k}{suffix}": float(found[k]) for k in names if k in found}
        low, high = found["win_rate_ci"]
        out[f"eval/win_rate_ci_low{suffix}"], out[f"eval/win_rate_ci_high{suffix}"] = low, high
        return out

    metrics = figures("", result)
    for temperature, found in result.get("by_temperature", {}).items():
        metrics |= figures(f"_t{temperature}", found)
    if result.get("vs_chosen"):
        metrics |= figures("_vs_chosen", result["vs_chosen"])
    return metrics


def log_evaluation(uri: str, run_id: str, result: dict, partial: Path, judge: str) -> None:
    import mlflow
    import pandas as pd

    c = client(uri)
    for name, value in eval_metrics(result, judge).items():
        c.log_metric(run_id, name, value)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_table(pd.DataFrame(result["samples"]), artifact_file="eval/samples.json")
        mlflow.log_artifact(str(partial / "report.md"), artifact_path="eval")


def evaluation_run(uri: str, dpo_run_id: str, eval_section: dict, partial: Path) -> str:
    """The MLflow run this evaluation is logged into.

    The first evaluation of a DPO run's weights goes into that run, beside its training curves,
    so runs of different β compare on it. A later one (other `eval` settings, same weights) is
    a record of its own: a run nested under the DPO run, holding its settings as params, never
    a second value at step 0 of the DPO run's history. The choice is kept in the partial
    folder, so a retried attempt logs where the first one began.
    """
    run_file = partial / RUN_FILE
    if run_file.is_file():
        return run_file.read_text().strip()
    c = client(uri)
    dpo_run = c.get_run(dpo_run_id)
    done = int(dpo_run.data.tags.get(EVALUATIONS_TAG, "0"))
    if not done and "eval/win_rate" in dpo_run.data.metrics:
        done = 1  # evaluated before this tag existed
    if done:
        run = c.create_run(
            dpo_run.info.experiment_id,
            run_name=f"{dpo_run.info.run_name} eval {done + 1}",
            tags={
                "mlflow.parentRunId": dpo_run_id,
                "dpoflow.stage": "evaluate",
                "dpoflow.dpo_run_id": dpo_run_id,
            },
        )
        run_id = run.info.run_id
        log_params(uri, run_id, flatten("eval", eval_section))
    else:
        run_id = dpo_run_id
    c.set_tag(dpo_run_id, EVALUATIONS_TAG, str(done + 1))
    run_file.write_text(run_id)
    return run_id


@stage_task("evaluate")
def evaluate(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    # Imported here, so a run that stops before this stage or finds it cached never loads
    # torch and transformers in its own process; the collector paused, as for the flow's
    # imports (dpoflow.process_gc).
    with imports_without_collection():
        from dpoflow.models.evaluation import JudgedLog, evaluate_policy
        from dpoflow.models.evaluation_report import markdown_report
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
            log=logger.info,
        )
        report = markdown_report(result, title="Win rate of dpo policy")
        (partial / "report.md").write_text(report)
        with open(partial / "samples.jsonl", "w", encoding="utf-8") as f:
            for sample in result["samples"]:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        figures = {k: v for k, v in result.items() if k != "samples"}
        write_json_atomic(partial / "result.json", figures)
        uri = tracking_uri(section["mlflow"]["tracking_uri"], workdir)
        run_id = evaluation_run(uri, dpo_manifest["mlflow_run_id"], ev, partial)
        log_evaluation(uri, run_id, result, partial, ev["judge"])  # ends the run it logs into
        trained = dpo_manifest["config"]["dpo"]
        headline = evaluation_headline(result, trained["beta"], trained["loss_type"], ev["judge"])
        set_description(uri, run_id, headline)
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
            "evaluation_run_id": run_id,  # the MLflow run holding this evaluation
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
