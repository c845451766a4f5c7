"""`dpoflow`: the one command line.

    dpoflow run                       # the whole pipeline on the embedded default
    dpoflow run --set dpo.beta=0.2    # dotted overrides, repeatable
    dpoflow validate DATA             # the Great Expectations gate on its own

Errors a user can cause end with one sentence naming the cause and the fix,
and exit code 1 (2 for usage errors); no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from dpoflow.config import DEFAULT_CONFIG, PipelineConfig, load_config
from dpoflow.data_checks.sources import require_source
from dpoflow.errors import UserError
from dpoflow.flows.prefect_api import prefect_api
from dpoflow.flows.run_view import stage_status
from dpoflow.process_gc import freeze_objects_at_exit, imports_without_collection
from dpoflow.tasks.sources import check_before_running, check_data_sources, check_model_source

app = typer.Typer(
    help="Align a language model to preferences with DPO: validate, SFT, DPO, evaluate, register.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # one sentence stays one line

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help=f"YAML config (default: {DEFAULT_CONFIG.name})."),
]
WorkdirOpt = Annotated[
    Path, typer.Option("--workdir", "-w", help="Work directory for outputs and the local stores.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config value, e.g. --set dpo.beta=0.2 (repeatable)."
    ),
]
SummaryOpt = Annotated[
    Path | None, typer.Option("--summary-json", help="Write the run's summary to this JSON file.")
]


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def unexpected(exc: BaseException) -> str:
    return (
        f"the pipeline stopped on an unexpected {type(exc).__name__} ({exc}); the log above "
        "shows where: fix the cause and run the same command again, finished stages are kept."
    )


def quiet_libraries() -> None:
    """Keep the terminal for our progress: silence telemetry and chatty loggers."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # mlflow sets its loggers' level from this when it is imported, over any setLevel before.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic", "httpx", "urllib3", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def summary_table(summary: dict) -> Table:
    table = Table(title="dpoflow run", show_header=True)
    table.add_column("stage")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for name, stage in summary["stages"].items():
        table.add_row(name, stage_status(stage), f"{stage['seconds']:.1f}")
    return table


def print_summary(summary: dict) -> None:
    out = Console()
    out.print(summary_table(summary))
    if "stopped_after" in summary:
        out.print(f"stopped after {summary['stopped_after']}; run without --until to go on.")
        return
    low, high = summary["win_rate_ci"]
    reg = summary["registered_model"]
    out.print(
        f"win rate {summary['win_rate']:.3f} (95% CI {low:.3f}-{high:.3f})  "
        f"reward {summary['reward_policy']:.3f} vs {summary['reward_reference']:.3f}  "
        f"KL {summary['kl']:.3f}\n"
        f"MLflow run {summary['mlflow_run_id']}  model {reg['name']} v{reg['version']} "
        f"{reg['aliases']}  {champion_note(reg)}",
        highlight=False,
    )


def champion_note(reg: dict) -> str:
    """Where `champion` points in the registry now (the summary reads it at the end)."""
    if reg.get("champion") is None:
        return "no champion"
    if reg["champion"] == reg["version"]:
        return "champion: this version"
    return f"champion: v{reg['champion']}"


def write_summary(path: Path | None, summary: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)


def run_pipeline(cfg: PipelineConfig, workdir: Path, until: str | None = None) -> dict:
    quiet_libraries()
    # Mistakes a user can fix are refused before Prefect starts (a missing model before the
    # stages, and torch with them, are even imported).
    check_before_running(cfg)
    with imports_without_collection():  # the stages, torch and transformers: see process_gc
        from dpoflow.flows.pipeline import check_stage_name, dpo_pipeline

    check_stage_name(until)
    with prefect_api(workdir):
        return dpo_pipeline(config=cfg.model_dump(mode="json"), workdir=str(workdir), until=until)


@app.command()
def run(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = Path(".dpoflow"),
    set_: SetOpt = None,
    summary_json: SummaryOpt = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            help="Stop after this stage of the pipeline (an unknown name is answered with the "
            "list); the same command without it goes on from there.",
        ),
    ] = None,
) -> None:
    """Run the whole pipeline: validate, SFT, reference log-probs, DPO, evaluate, register,
    promote."""
    try:
        cfg = load_config(config, set_ or [])
        summary = run_pipeline(cfg, workdir, until)
    except UserError as exc:
        fail(str(exc))
    except Exception as exc:  # a bug or a crash: say so plainly, keep what finished
        fail(unexpected(exc))
    print_summary(summary)
    write_summary(summary_json, summary)


@app.command()
def validate(
    data: Annotated[str, typer.Argument(help="Preference data: a file, a folder, a hub name.")],
    config: ConfigOpt = None,
    workdir: WorkdirOpt = Path(".dpoflow"),
    set_: SetOpt = None,
) -> None:
    """Check preference data with the Great Expectations suite, as the pipeline's validate
    stage does (the config's tokenizer, chat template and max_length); exit 1 if it fails."""
    quiet_libraries()
    try:
        cfg = load_config(config, set_ or [])
        check_model_source(cfg.model.base)
        # Before anything is built (the embedded default's model and prompts, say).
        require_source(data, named_by="the DATA argument")
        check_data_sources(cfg, names=("eval_prompts",))  # DATA stands for data.train
        from dpoflow.data_checks.suite import render_failures_table
        from dpoflow.tasks.sources import resolve_sources
        from dpoflow.tasks.validate import check_data

        sources = resolve_sources(cfg, workdir)
        _, _, report = check_data(
            cfg.data.model_dump(mode="json"),
            data,
            sources["eval_data"]["path"],
            sources["base_model"],
            cfg.dpo.max_length,
            max_prompt_length=cfg.dpo.max_prompt_length,
        )
    except UserError as exc:
        fail(str(exc))
    if report.success:
        Console().print(f"[green]ok:[/] {report.n_rows} pairs passed validation")
        warnings = [o for o in report.outcomes if not o.success]
        if warnings:
            Console().print(render_failures_table(report))
        return
    Console().print(render_failures_table(report))
    fail(report.summary_message())


def _win_rate(row: dict) -> str:
    """Tags "0.604" and "[0.4076, 0.7720]" -> "0.604 (0.408-0.772)"; blank if untagged."""
    if not row["win_rate"]:
        return ""
    low, high = json.loads(row["win_rate_ci"] or "[nan, nan]")
    return f"{float(row['win_rate']):.3f} ({low:.3f}-{high:.3f})"


def versions_table(rows: list[dict], uri: str) -> Group:
    """Registered versions, newest first, with aliases and figures; then each version's
    promotion reason on its own line (reasons are sentences: too long for a column)."""
    table = Table(title=f"registered models at {uri}", show_header=True, box=box.SIMPLE)
    for column in ("model", "version", "aliases", "win rate (95% CI)", "β", "loss", "judge"):
        table.add_column(column)  # wraps between words only, so names stay whole
    for row in rows:
        table.add_row(
            row["name"],
            row["version"],
            ", ".join(row["aliases"]),
            _win_rate(row),
            row["beta"],
            row["loss_type"],
            row["judge"],
        )
    reasons = [
        Text(f"{row['name']} v{row['version']}: {row['promotion.reason']}")
        for row in rows
        if row["promotion.reason"]
    ]
    return Group(table, *reasons)


def promote_by_hand(
    cfg: PipelineConfig, workdir: Path, name: str, version: str, *, force: bool
) -> dict:
    """The promotion gate on one version, with the config's evaluation prompts (as the
    validate stage wrote them) and settings: what the pipeline's promote stage does."""
    with imports_without_collection():
        from dpoflow.flows.pipeline import validated_output
        from dpoflow.tasks.promote import gate_prompts, promote_version
        from dpoflow.tasks.tracking import tracking_uri

    prompts: list[str] = []
    if not force:
        validated = validated_output(cfg, workdir)
        if validated is None:
            raise UserError(
                f"the evaluation prompts of this config have not been validated in {workdir}: "
                "run `dpoflow run --until validate` with the same config and --workdir first."
            )
        prompts = gate_prompts(Path(validated["path"]) / "eval_prompts.jsonl", cfg.eval.num_prompts)
    return promote_version(
        tracking_uri(cfg.mlflow.tracking_uri, workdir),
        name,
        version,
        prompts,
        cfg.eval.model_dump(mode="json"),
        force=force,
    )


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="A registered model (default: all).")] = None,
    config: ConfigOpt = None,
    workdir: WorkdirOpt = Path(".dpoflow"),
    set_: SetOpt = None,
) -> None:
    """List registered model versions with their aliases, win rates and promotion reasons."""
    quiet_libraries()
    try:
        from dpoflow.tasks.promote import list_versions, registry
        from dpoflow.tasks.tracking import tracking_uri

        uri = tracking_uri(load_config(config, set_ or []).mlflow.tracking_uri, workdir)
        rows = list_versions(registry(uri), name)
    except UserError as exc:
        fail(str(exc))
    if not rows:
        Console().print(f"no registered models at {uri}: run `dpoflow run` to register one.")
        return
    Console().print(versions_table(rows, uri))


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="The registered model, e.g. dpoflow-policy.")],
    version: Annotated[
        str | None, typer.Argument(help="The version to make champion (not with --rollback).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Skip the promotion checks.")] = False,
    rollback: Annotated[
        bool,
        typer.Option("--rollback", help="Move champion back to the previous champion."),
    ] = False,
    config: ConfigOpt = None,
    workdir: WorkdirOpt = Path(".dpoflow"),
    set_: SetOpt = None,
) -> None:
    """Make VERSION the champion if it passes the gate (vs reference, then vs champion), or
    with --rollback move champion back to the version it replaced."""
    quiet_libraries()
    if (version is None) != rollback:
        console.print(
            "[bold red]error:[/] give either a VERSION to promote or --rollback, not "
            f"{'both' if rollback else 'neither'}: e.g. `dpoflow promote {name} 3` or "
            f"`dpoflow promote {name} --rollback`.",
            highlight=False,
        )
        raise typer.Exit(2)
    try:
        cfg = load_config(config, set_ or [])
        if rollback:
            from dpoflow.tasks.promote import rollback as roll_back
            from dpoflow.tasks.tracking import tracking_uri

            done = roll_back(tracking_uri(cfg.mlflow.tracking_uri, workdir), name)
            Console().print(
                f"{name} v{done['version']} {done['aliases']}: champion again, rolled back "
                f"from v{done['rolled_back_from']}",
                highlight=False,
            )
            return
        outcome = promote_by_hand(cfg, workdir, name, version, force=force)
    except UserError as exc:
        fail(str(exc))
    if not outcome["promoted"]:
        fail(
            f"{name} v{outcome['version']} stays candidate ({outcome['reason']}): train a better "
            "policy, or pass --force to promote it anyway."
        )
    Console().print(f"{name} v{outcome['version']} {outcome['aliases']}: {outcome['reason']}")


@app.command()
def serve(
    model: Annotated[
        str | None,
        typer.Option("--model", help="The registered model (default: registry.model_name)."),
    ] = None,
    alias: Annotated[str, typer.Option("--alias", help="The alias to serve and follow.")] = (
        "champion"
    ),
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 5001,
    poll_seconds: Annotated[
        float, typer.Option("--poll-seconds", help="How often to check where the alias points.")
    ] = 10.0,
    config: ConfigOpt = None,
    workdir: WorkdirOpt = Path(".dpoflow"),
    set_: SetOpt = None,
) -> None:
    """Serve the version ALIAS points to (MLflow's /invocations, OpenAI's /v1/chat/completions,
    /health) and follow the alias: a promotion or rollback is served without a restart."""
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        from dpoflow.flows.serve import serve as serve_alias
        from dpoflow.tasks.tracking import tracking_uri

        cfg = load_config(config, set_ or [])
        uri = tracking_uri(cfg.mlflow.tracking_uri, workdir)
        serve_alias(uri, model or cfg.registry.model_name, alias, host, port, poll_seconds)
    except UserError as exc:
        fail(str(exc))


@app.command()
def sweep(
    betas: Annotated[str, typer.Option("--betas", help="Comma-separated βs, e.g. 0.05,0.1,0.5.")],
    loss_types: Annotated[
        str | None,
        typer.Option("--loss-types", help="Comma-separated loss types (default: dpo.loss_type)."),
    ] = None,
    config: ConfigOpt = None,
    workdir: WorkdirOpt = Path(".dpoflow"),
    set_: SetOpt = None,
    summary_json: SummaryOpt = None,
) -> None:
    """Run the pipeline for each β (x loss type) under one MLflow parent run, with the
    reward-KL frontier plot; validate, SFT and reference log-probs run once."""
    try:
        from dpoflow.flows.sweep import child_configs, parse_list

        cfg = load_config(config, set_ or [])
        beta_list = parse_list(betas, "--betas", float)
        loss_list = parse_list(loss_types, "--loss-types") if loss_types else None
        child_configs(cfg, beta_list, loss_list or [cfg.dpo.loss_type])  # refuse before running
        check_before_running(cfg)
        quiet_libraries()
        from dpoflow.flows.sweep import beta_sweep

        with prefect_api(workdir):
            summary = beta_sweep(
                config=cfg.model_dump(mode="json"),
                betas=beta_list,
                loss_types=loss_list,
                workdir=str(workdir),
            )
    except UserError as exc:
        fail(str(exc))
    from dpoflow.flows.sweep_print import print_sweep

    print_sweep(summary)
    write_summary(summary_json, summary)


def main() -> None:
    freeze_objects_at_exit()
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted: finished stages are kept; run the same command to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
