"""What a person sees of a pipeline run in Prefect: its name, its tags, its artifacts.

A flow run is named after what it trains (`dpo β=0.1 sigmoid`) and tagged with β, the loss
type and the model, so the runs list answers "which one was that?" without opening a run.
At the end of every run, cached or not, the flow publishes from the stage outputs (not from
inside the stages, which a cached run skips):

- `run-summary`: the stage table (completed / cached), the headline result, links;
- `win-rate`: the evaluation report, its title naming β, loss type and model version;
- `eval-samples`: the judged samples, short columns first and the texts last;
- `mlflow-run`, `model-version`: links into the MLflow UI.

Artifacts are a courtesy: one that cannot be published is a warning, never a failed run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpoflow.config import PipelineConfig, resolve_config
from dpoflow.tasks.tracking import tracking_uri

# Where `mlflow ui` serves a local (SQLite) store by default: the README's instructions.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
SAMPLE_ROWS = 50
SAMPLE_TEXT_LIMIT = 300  # characters of a prompt or answer in the samples table


def _warn(message: str, *args: Any) -> None:
    # Imported here: the CLI imports this module for `stage_status` and starts without Prefect.
    from dpoflow.tasks.common import stage_logger

    stage_logger().warning(message, *args)


def describe(cfg: PipelineConfig) -> str:
    """What a run trains, for the Prefect flow run's name: `dpo β=0.1 sigmoid` (the MLflow
    run of the same training is `dpo-sigmoid-beta0.1`)."""
    return f"dpo β={cfg.dpo.beta:g} {cfg.dpo.loss_type}"


def model_label(base: str) -> str:
    """The base model as a short tag: a hub name or `embedded:...` as is, a folder by name."""
    if base.startswith(("/", ".", "~")):
        return Path(base).name or base
    return base


def labels(cfg: PipelineConfig, betas: list[float], loss_types: list[str]) -> list[str]:
    """Tags naming each β, each loss type and the model: what a user filters runs by."""
    return [
        *(f"beta:{beta:g}" for beta in betas),
        *(f"loss:{loss}" for loss in loss_types),
        f"model:{model_label(cfg.model.base)}",
    ]


def run_tags(cfg: PipelineConfig) -> list[str]:
    """A pipeline run's tags: `beta:0.1`, `loss:sigmoid`, `model:...`."""
    return labels(cfg, [cfg.dpo.beta], [cfg.dpo.loss_type])


def sweep_tags(cfg: PipelineConfig, betas: list[float], loss_types: list[str]) -> list[str]:
    """A sweep's tags: each β and loss type it trains, the model, and `sweep`."""
    return [*labels(cfg, betas, loss_types), "sweep"]


def _parameters() -> dict[str, Any]:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return dict(context.parameters or {}) if context is not None else {}


def pipeline_run_name() -> str:
    """The pipeline's flow run name (Prefect calls it once the parameters are known).
    A config that does not validate keeps Prefect's default; the flow then says why."""
    params = _parameters()
    try:
        name = describe(resolve_config(params.get("config") or {}))
    except Exception:
        return "dpo-pipeline"
    return f"{name} until {params['until']}" if params.get("until") else name


def sweep_run_name() -> str:
    """The sweep's flow run name: `sweep β=0.1,0.5 sigmoid`."""
    params = _parameters()
    try:
        cfg = resolve_config(params.get("config") or {})
    except Exception:
        return "dpo-beta-sweep"
    betas = ",".join(f"{float(b):g}" for b in params.get("betas") or [])
    return f"sweep β={betas} {'+'.join(params.get('loss_types') or [cfg.dpo.loss_type])}"


def tag_flow_run(tags: list[str]) -> None:
    """Add `tags` to the running flow run. Tags are set here, not where the run is created,
    so a deployment's scheduled run and a sweep's child get them as the CLI's run does."""
    from prefect import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    merged = list(dict.fromkeys([*(context.flow_run.tags or []), *tags]))
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, tags=merged)
        context.flow_run.tags = merged
    except Exception as exc:
        _warn("the flow run's tags were not set (%s)", exc)


def mlflow_ui(uri: str) -> str:
    """The MLflow UI for a tracking URI: the server itself, or where `mlflow ui` serves a
    local store."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_MLFLOW_UI


def mlflow_links(cfg: PipelineConfig, work: Path, manifests: dict, summary: dict | None) -> dict:
    """{label: (url, text)} for the DPO run and the registered version, where they exist."""
    uri = tracking_uri(cfg.mlflow.tracking_uri, work)
    ui = mlflow_ui(uri)
    links: dict[str, tuple[str, str]] = {}
    run_id = (manifests.get("dpo") or {}).get("mlflow_run_id")
    if run_id:
        from dpoflow.tasks.tracking import client

        experiment = client(uri).get_run(run_id).info.experiment_id
        url = f"{ui}/#/experiments/{experiment}/runs/{run_id}"
        links["mlflow-run"] = (url, f"MLflow run of {describe(cfg)}")
    registered = (summary or {}).get("registered_model") or manifests.get("register")
    if registered:
        name, version = registered["name"], registered["version"]
        links["model-version"] = (f"{ui}/#/models/{name}/versions/{version}", f"{name} v{version}")
    return links


def stage_status(stage: dict) -> str:
    """ "completed", "cached", or how far an interrupted attempt had got."""
    if stage.get("resumed_from_step"):
        return f"{stage['status']} (resumed from step {stage['resumed_from_step']})"
    if stage.get("resumed_judged_prompts"):
        return f"{stage['status']} (resumed: {stage['resumed_judged_prompts']} prompts judged)"
    return stage["status"]


def headline(summary: dict) -> str:
    low, high = summary["win_rate_ci"]  # as tasks.lineage.interval writes it (not imported
    # here: this module is read by the CLI before anything heavy is loaded)
    return (
        f"win rate **{summary['win_rate']:.3f}** (95% CI {low:.3f}-{high:.3f}), "
        f"reward {summary['reward_policy']:.3f} vs {summary['reward_reference']:.3f}, "
        f"KL {summary['kl']:.3f}"
    )


def summary_markdown(
    title: str, stages: dict[str, dict], summary: dict | None, links: dict, until: str | None
) -> str:
    lines = [f"# {title}", ""]
    if summary is not None:
        reg = summary["registered_model"]
        lines += [headline(summary), ""]
        lines += [f"model {reg['name']} v{reg['version']}, aliases {', '.join(reg['aliases'])}"]
        if reg.get("promotion_reason"):
            verdict = "promoted" if reg.get("promoted") else "not promoted"
            lines += ["", f"{verdict}: {reg['promotion_reason']}"]
        lines.append("")
    elif until:
        lines += [f"stopped after {until} as asked; run without --until to go on", ""]
    lines += ["| stage | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {n} | {stage_status(s)} | {s['seconds']:.1f} |" for n, s in stages.items()]
    if links:
        lines += ["", " · ".join(f"[{text}]({url})" for url, text in links.values())]
    return "\n".join(lines) + "\n"


def samples_table(samples: list[dict]) -> list[dict]:
    """Judged samples as table rows that fit a page: the short columns first, the texts last
    and bounded."""

    def text(value: str) -> str:
        value = " ".join(value.split())
        return value if len(value) <= SAMPLE_TEXT_LIMIT else value[: SAMPLE_TEXT_LIMIT - 1] + "…"

    return [
        {
            "verdict": s["verdict"],
            "policy score": round(s["policy_score"], 3),
            "reference score": round(s["reference_score"], 3),
            "prompt": text(s["prompt"]),
            "policy answer": text(s["policy_answer"]),
            "reference answer": text(s["reference_answer"]),
        }
        for s in samples[:SAMPLE_ROWS]
    ]


def evaluation_of(manifest: dict) -> dict:
    """The evaluate stage's figures and samples, read back from its output folder."""
    folder = Path(manifest["path"])
    result = json.loads((folder / "result.json").read_text())
    with open(folder / "samples.jsonl", encoding="utf-8") as f:
        result["samples"] = [json.loads(line) for line in f if line.strip()]
    return result


def publish_run_view(
    cfg: PipelineConfig,
    work: Path,
    stages: dict[str, dict],
    manifests: dict[str, dict],
    summary: dict | None,
    until: str | None = None,
) -> None:
    """Publish the run's artifacts (module docstring). Each that fails is one warning and
    the others are still published; the run summary comes last, so it is listed first."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    from dpoflow.models.evaluation_report import markdown_report

    title = describe(cfg)
    links: dict[str, tuple[str, str]] = {}
    try:
        links = mlflow_links(cfg, work, manifests, summary)
        for key, (url, text) in links.items():
            create_link_artifact(link=url, link_text=text, key=key, description=title)
    except Exception as exc:
        _warn("the MLflow link artifacts were not published (%s)", exc)
    if "evaluate" in manifests:
        try:
            result = evaluation_of(manifests["evaluate"])
            reg = (summary or {}).get("registered_model")
            version = f"{reg['name']} v{reg['version']}" if reg else "not registered yet"
            report = markdown_report(result, title=f"Win rate of {title}, {version}")
            create_markdown_artifact(key="win-rate", markdown=report, description=title)
            create_table_artifact(
                key="eval-samples",
                table=samples_table(result["samples"]),
                description=f"{title}: policy vs reference answers, judge "
                f"{manifests['evaluate']['judge']}",
            )
        except Exception as exc:
            _warn("the win-rate and eval-samples artifacts were not published (%s)", exc)
    try:
        create_markdown_artifact(
            key="run-summary",
            markdown=summary_markdown(title, stages, summary, links, until),
            description=title,
        )
    except Exception as exc:
        _warn("the run-summary artifact was not published (%s)", exc)
