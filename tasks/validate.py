"""Stage 1: validate the preference data with Great Expectations.

Reads the data once, normalises it (id, prompt, chosen, rejected), runs the
suite, and on success writes the normalised pairs and evaluation prompts that
every later stage reads. On failure it stops the flow before any training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from flows.errors import DataError
from tasks.common import build_once, stage_task
from tasks.stage import sha256_file


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def validate_data(
    partial: Path,
    data: dict[str, Any],
    train: str,
    eval_prompts: str,
    model_path: str,
    max_length: int,
) -> dict[str, Any]:
    """Load, validate, and write `pairs.jsonl` + `eval_prompts.jsonl` into `partial`."""
    from transformers import AutoTokenizer

    from data_checks.suite import load_and_validate

    tokenizer = AutoTokenizer.from_pretrained(model_path)  # lengths as the run will see them
    pairs, prompts, report = load_and_validate(
        train,
        eval_prompts,
        data,
        tokenizer=tokenizer,  # renders conversational data with its chat template
        max_length=max_length,
        report_dir=partial / "report",
    )
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
    except Exception:  # an artifact is a courtesy; never fail validation over it
        pass
    if not report.success:
        raise DataError(f"{report.summary_message()} (report: {partial / 'report'})")
    write_jsonl(
        partial / "pairs.jsonl", pairs[["id", "prompt", "chosen", "rejected"]].to_dict("records")
    )
    keep = [c for c in ("id", "prompt", "chosen") if c in prompts.columns]
    write_jsonl(partial / "eval_prompts.jsonl", prompts[keep].to_dict("records"))
    return {
        "data_sha256": sha256_file(partial / "pairs.jsonl"),
        "n_pairs": len(pairs),
        "n_eval_prompts": len(prompts),
        "validation_success": True,
        "warnings": [o.name for o in report.outcomes if not o.success],
    }


@stage_task("validate", retries=0)
def validate(
    key: str,
    workdir: str,
    data: dict,
    train: str,
    eval_prompts: str,
    model_path: str,
    max_length: int,
    inputs: dict,
) -> dict:
    logger = get_run_logger()

    def build(partial: Path) -> dict:
        logger.info("validating %s", train)
        extra = validate_data(partial, data, train, eval_prompts, model_path, max_length)
        logger.info("%d pairs passed validation", extra["n_pairs"])
        return {"config": data, "inputs": inputs, **extra}

    return build_once("validate", key, workdir, build)
