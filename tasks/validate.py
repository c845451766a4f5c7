"""Stage 1: validate the preference data with Great Expectations.

Reads the data once, normalises it (id, prompt, chosen, rejected), runs the
suite, and on success writes the normalised pairs and evaluation prompts that
every later stage reads. On failure it stops the flow before any training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpoflow.errors import DataError
from dpoflow.tasks.common import Stage, build_once, dump, in_prefect_run, stage_logger, stage_task
from dpoflow.tasks.stage import sha256_file


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def publish_report(report, train: str) -> None:
    """The suite's outcome as a Prefect table artifact: a courtesy, never a reason to fail."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact(
            key="data-validation",
            table=[
                {
                    "expectation": o.name,
                    "column": o.column,
                    "severity": o.severity,
                    "success": o.success,
                    "unexpected": o.unexpected_count,
                }
                for o in report.outcomes
            ],
            description=f"Great Expectations on {train}: {report.n_rows} rows",
        )
    except Exception as exc:
        stage_logger().warning("the data-validation artifact was not published (%s)", exc)


def check_data(
    data: dict[str, Any],
    train: str,
    eval_prompts: str,
    base_model: dict[str, str],
    max_length: int,
    report_dir: Path | None = None,
    max_prompt_length: int | None = None,
):
    """The suite on the data as the run will see it: what `dpoflow validate` and this stage
    both do, so they give one verdict. The base model's tokenizer renders prompts with its
    chat template (data.chat_template) and measures lengths; with `max_prompt_length` the
    token-boundary checks run on the rows DPO's own tokenization builds. Returns (pairs,
    prompts, report)."""
    from functools import partial

    from transformers import AutoTokenizer

    from dpoflow.data_checks.suite import load_and_validate
    from dpoflow.models.logprobs import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(
        base_model["path"], revision=base_model.get("revision")
    )
    tokenize = None
    if max_prompt_length is not None:
        limits = dict(max_length=max_length, max_prompt_length=max_prompt_length)
        tokenize = partial(tokenize_example, tokenizer, **limits)
    return load_and_validate(
        train,
        eval_prompts,
        data,
        tokenizer=tokenizer,
        max_length=max_length,
        report_dir=report_dir,
        tokenize=tokenize,
    )


def validate_data(
    partial: Path,
    data: dict[str, Any],
    train: str,
    eval_prompts: str,
    base_model: dict[str, str],
    max_length: int,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """Load, validate, and write `pairs.jsonl` + `eval_prompts.jsonl` into `partial`."""
    pairs, prompts, report = check_data(
        data,
        train,
        eval_prompts,
        base_model,
        max_length,
        report_dir=partial / "report",
        max_prompt_length=max_prompt_length,
    )
    publish_report(report, train)
    if not report.success:
        raise DataError(f"{report.summary_message()} (report: {partial / 'report'})")
    write_jsonl(
        partial / "pairs.jsonl", pairs[["id", "prompt", "chosen", "rejected"]].to_dict("records")
    )
    keep = [c for c in ("id", "prompt", "chosen") if c in prompts.columns]
    write_jsonl(partial / "eval_prompts.jsonl", prompts[keep].to_dict("records"))
    return {
        "data_sha256": sha256_file(partial / "pairs.jsonl"),
        "prompts_sha256": sha256_file(partial / "eval_prompts.jsonl"),
        "n_pairs": len(pairs),
        "n_eval_prompts": len(prompts),
        "validation_success": True,
        "warnings": [o.name for o in report.outcomes if not o.success],
    }


@stage_task("validate", retries=0)
def validate(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    logger = stage_logger()
    train = upstream["train_data"]["path"]

    def build(partial: Path) -> dict:
        logger.info("validating %s", train)
        extra = validate_data(
            partial,
            section["data"],
            train,
            upstream["eval_data"]["path"],
            upstream["base_model"],
            section["max_length"],
            section["max_prompt_length"],
        )
        logger.info("%d pairs passed validation", extra["n_pairs"])
        return extra

    return build_once("validate", key, workdir, section, upstream, build)


STAGE = Stage(
    name="validate",
    task=validate,
    # Lengths and token boundaries are checked with the tokenizer, at DPO's limits.
    reads=lambda cfg, _: {
        "data": dump(cfg.data),
        "max_length": cfg.dpo.max_length,
        "max_prompt_length": cfg.dpo.max_prompt_length,
    },
    inputs={
        "train": "train_data.sha256",
        "eval_prompts": "eval_data.sha256",
        "tokenizer": "base_model.sha256",
    },
)
