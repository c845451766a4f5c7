"""The Great Expectations gate in front of training.

Bad preference data (empty answers, chosen == rejected, eval prompts in the training set)
trains a worse model without any error, so it is stopped here, with the expectation, the
column and example rows named. The checks are real GX 1.x expectations run through an
ephemeral GX context so that the results and Data Docs are standard GX artefacts.

Helper columns (stripped text, token counts, length ratios) are computed once, vectorised,
so that 100,000 pairs validate in seconds; values that are not text are kept out of the
helpers so that a list or a number is reported, never crashed on.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from dpoflow.data_checks.report_html import PAGE, render
from dpoflow.data_checks.token_checks import Tokenize, Truncation, token_columns
from dpoflow.errors import ConfigError

if TYPE_CHECKING:
    from rich.table import Table

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
CONTROL_CHARS = r"[\x00-\x08\x0b-\x1f\x7f]"
MAX_EXAMPLES = 5
#: Characters of one text that are tokenised; longer texts are counted on this prefix,
#: which keeps a single huge string cheap (no tokenizer packs 32 characters in a token).
TOKENIZE_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class Check:
    """What a check means to a user: its default severity, the problem and the fix."""

    default: str
    problem: str
    fix: str


CHECKS: dict[str, Check] = {
    "required_columns": Check("error", "the column is missing", "add it or map it in data.columns"),
    "not_null": Check("error", "missing (null/NaN) values", "fill or drop those rows"),
    "is_text": Check(
        "error", "values that are not text (numbers, lists or dicts)", "make them strings"
    ),
    "not_empty": Check("error", "empty or whitespace-only text", "fix or drop those rows"),
    "no_control_chars": Check(
        "error", "control characters other than newline and tab", "remove them from the text"
    ),
    "chosen_differs": Check(
        "error", "chosen is the same as rejected", "drop those pairs, they teach nothing"
    ),
    "unique_rows": Check(
        "error", "duplicated (prompt, chosen, rejected) rows", "deduplicate the data"
    ),
    "min_rows": Check("error", "too few rows", "add data or lower data.min_rows"),
    "max_length": Check(
        "warning",
        "prompt + answer longer than max_length tokens",
        "shorten those rows or raise max_length (they would be truncated)",
    ),
    "no_eval_leakage": Check(
        "error",
        "training prompts that are also evaluation prompts",
        "remove them from the training data so the evaluation stays fair",
    ),
    "length_ratio": Check(
        "warning",
        "mean chosen/rejected character-length ratio out of range",
        "check for a length bias between chosen and rejected answers",
    ),
    "prompt_token_prefix": Check(
        "error",
        "the prompt's tokens are not a prefix of prompt + answer tokenized whole "
        "(prompt and answer merge into other tokens at their boundary)",
        "end prompts at a word or turn boundary (no trailing space) or start answers there",
    ),
    "one_bos": Check(
        "error",
        "a row holds a second bos token (at its start, or inside the data's text)",
        "remove bos text from prompts and answers: tokenization adds the one bos",
    ),
    "one_eos": Check(
        "error",
        "an answer holds an eos token before its end (e.g. its own eos text)",
        "remove eos text from answers: tokenization adds the one eos",
    ),
    "answer_left_after_truncation": Check(
        "error",
        "an answer with no token left but special tokens after truncation",
        "shorten the prompts or raise dpo.max_length, or drop those rows",
    ),
    "truncated_share": Check(
        "error",
        "too many answers are cut at max_length",
        "raise dpo.max_length or data.max_truncated_share, or shorten the answers",
    ),
}
SEVERITIES = ("error", "warning")


@dataclass
class ExpectationOutcome:
    """The result of one expectation, in the words the CLI and the flow report."""

    name: str  # GX expectation type, e.g. "expect_column_values_to_not_be_null"
    column: str
    severity: str  # "error" | "warning"
    success: bool
    unexpected_count: int
    examples: list[int]  # 0-based row numbers, at most 5
    detail: str = ""
    check: str = ""  # short name used in `severities`, e.g. "not_null"


@dataclass
class ValidationReport:
    """All outcomes of one validation; ``success`` is False if any error-level one failed."""

    success: bool
    n_rows: int
    outcomes: list[ExpectationOutcome]
    data_docs_dir: str | None = None

    def failures(self) -> list[ExpectationOutcome]:
        """Failed outcomes, errors first."""
        failed = [o for o in self.outcomes if not o.success]
        return sorted(failed, key=lambda o: o.severity != "error")

    def summary_message(self) -> str:
        """One sentence per failed error-level expectation, naming column and example rows."""
        errors = [o for o in self.failures() if o.severity == "error"]
        if not errors:
            warnings = len(self.failures())
            suffix = f" ({warnings} warning(s))" if warnings else ""
            return f"all error-level expectations passed on {self.n_rows} rows{suffix}."
        return " ".join(_sentence(o, self.n_rows) for o in errors)

    def to_dict(self) -> dict:
        """JSON-ready form, written to validation.json and logged to MLflow."""
        return {
            "success": self.success,
            "n_rows": self.n_rows,
            # Relative to this JSON's folder: true after the folder is renamed into place,
            # copied, or logged to MLflow (an absolute path would name the build folder).
            "data_docs": "index.html" if self.data_docs_dir else None,
            "summary_page": PAGE if self.data_docs_dir else None,
            "outcomes": [asdict(o) for o in self.outcomes],
            "summary": self.summary_message(),
        }


def _sentence(outcome: ExpectationOutcome, n_rows: int) -> str:
    check = CHECKS.get(outcome.check)
    fix = check.fix if check else "fix the data"
    names = [c for c in outcome.column.split(", ") if c]
    where = ""
    if names:
        plural = "s" if len(names) > 1 else ""
        where = f" on column{plural} " + ", ".join(f"'{n}'" for n in names)
    if outcome.examples:
        rows = ", ".join(str(r) for r in outcome.examples)
        more = ", ..." if outcome.unexpected_count > len(outcome.examples) else ""
        count = f" for {outcome.unexpected_count} of {n_rows} rows (rows {rows}{more})"
    else:
        count = ""
    return f"{outcome.name} failed{where}{count}: {outcome.detail}; {fix}."


# --------------------------------------------------------------------------- validation


def validate_preferences(
    df: pd.DataFrame,
    *,
    min_rows: int = 1,
    severities: dict[str, str] | None = None,
    eval_prompts: list[str] | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    max_length_ratio: float = 3.0,
    report_dir: pathlib.Path | None = None,
    tokenize: Tokenize | None = None,
    templated: bool = False,
    max_truncated_share: float = 1.0,
) -> ValidationReport:
    """Run the preference-data expectations and return a report (never raises on bad data).

    ``severities`` overrides the default severity per check short name (see ``CHECKS``).
    ``eval_prompts`` turns on the leakage check; ``tokenizer`` with ``max_length`` turns
    on the token-length check; ``tokenizer`` with ``tokenize`` (training's tokenization,
    limits bound) turns on the token-boundary checks (`token_checks`), ``templated`` saying
    whether a chat template rendered the prompts, ``max_truncated_share`` the share of cut
    answers above which they fail. With ``report_dir``, GX Data Docs and
    ``validation.json`` are written there.
    """
    levels = _severities(severities)
    frame, truncation = _validation_frame(
        df, eval_prompts, tokenizer, max_length, tokenize, templated
    )
    specs = _expectation_specs(frame, df, min_rows, eval_prompts, max_length, max_length_ratio)
    if truncation is not None:
        specs += _token_specs(truncation, max_length, max_truncated_share)
    results = _run_gx(frame, [spec[0] for spec in specs], report_dir)
    outcomes = [
        _outcome(result, meta, levels) for result, (_, meta) in zip(results, specs, strict=True)
    ]
    report = ValidationReport(
        success=all(o.success or o.severity != "error" for o in outcomes),
        n_rows=len(frame),
        outcomes=outcomes,
        data_docs_dir=str(report_dir) if report_dir is not None else None,
    )
    if report_dir is not None:
        saved = report.to_dict()
        path = pathlib.Path(report_dir) / "validation.json"
        path.write_text(json.dumps(saved, indent=2, default=str), encoding="utf-8")
        (pathlib.Path(report_dir) / PAGE).write_text(render(saved), encoding="utf-8")
    return report


def load_and_validate(
    train: str,
    eval_prompts: str,
    data: dict[str, Any],
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    report_dir: pathlib.Path | None = None,
    tokenize: Tokenize | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, ValidationReport]:
    """Load the training pairs and the eval prompts as the config's ``data`` section says
    (split, revision, columns, chat_template, min_rows, severities, max_truncated_share) and
    run the suite on them: what `dpoflow validate` and the pipeline's validate stage both do.
    With a ``tokenizer`` prompts are rendered with its chat template (data.chat_template) and,
    with ``max_length``, token lengths are checked; with ``tokenize`` too, token boundaries.
    Returns (pairs, prompts, report)."""
    from dpoflow.data_checks.loading import load_preferences, load_prompts, uses_chat_template

    mode = data.get("chat_template", "auto")
    pairs = load_preferences(
        train,
        split=data["split"],
        revision=data["revision"],
        columns=data["columns"] or None,
        tokenizer=tokenizer,
        chat_template=mode,
    )
    prompts = load_prompts(eval_prompts, tokenizer=tokenizer, chat_template=mode)
    report = validate_preferences(
        pairs,
        min_rows=data["min_rows"],
        severities=data["severities"] or None,
        eval_prompts=prompts["prompt"].tolist(),
        tokenizer=tokenizer,
        max_length=max_length,
        report_dir=report_dir,
        tokenize=tokenize,
        templated=uses_chat_template(tokenizer, mode),
        max_truncated_share=data.get("max_truncated_share", 1.0),
    )
    return pairs, prompts, report


def _severities(overrides: dict[str, str] | None) -> dict[str, str]:
    levels = {name: check.default for name, check in CHECKS.items()}
    for name, level in (overrides or {}).items():
        if name not in CHECKS:
            raise ConfigError(
                f"data.severities has unknown check '{name}': use one of {', '.join(CHECKS)}."
            )
        if level not in SEVERITIES:
            raise ConfigError(
                f"data.severities.{name} is '{level}': set it to 'error' or 'warning'."
            )
        levels[name] = level
    return levels


# --------------------------------------------------------------------------- helper columns


def _validation_frame(
    df: pd.DataFrame,
    eval_prompts: list[str] | None,
    tokenizer: Any,
    max_length: int | None,
    tokenize: Tokenize | None = None,
    templated: bool = False,
) -> tuple[pd.DataFrame, Truncation | None]:
    """Copy the text columns as object dtype (raw values) and add vectorised helpers.

    Helpers hold only real text (pandas' ``str`` dtype, NaN elsewhere) so that a list or
    a number is reported by the ``is_text`` check instead of breaking a string operation.
    They are few and compact because GX fingerprints the whole frame on every run.
    """
    frame = pd.DataFrame(index=pd.RangeIndex(len(df)))
    present = [c for c in TEXT_COLUMNS if c in df.columns]
    texts: dict[str, pd.Series] = {}
    for column in present:
        values = pd.Series(df[column].to_numpy(dtype=object), dtype=object)
        frame[column] = values
        texts[column] = values.where(values.map(type).eq(str), None).astype("str")
        frame[f"{column}__stripped"] = texts[column].str.strip().astype(object)
    if eval_prompts is not None and "prompt" in present:
        frame["prompt__normalised"] = _normalise_for_leakage(texts["prompt"])
    if {"chosen", "rejected"} <= set(present):
        frame["__length_ratio"] = _length_ratio(texts["chosen"], texts["rejected"])
    if tokenizer is not None and max_length is not None and set(TEXT_COLUMNS) <= set(present):
        frame["__pair_tokens"] = _pair_tokens(texts, tokenizer, max_length)
    truncation = None
    if tokenizer is not None and tokenize is not None and set(TEXT_COLUMNS) <= set(present):
        raw = {c: df[c].reset_index(drop=True) for c in TEXT_COLUMNS}
        columns, truncation = token_columns(raw, tokenizer, tokenize, templated)
        frame = pd.concat([frame, columns], axis=1)
    return frame, truncation


def _normalise_for_leakage(text: pd.Series) -> pd.Series:
    """Whitespace differences must not hide a leaked prompt."""
    return text.str.replace(r"\s+", " ", regex=True).str.strip()


def _length_ratio(chosen: pd.Series, rejected: pd.Series) -> pd.Series:
    both = chosen.notna() & rejected.notna()
    chosen_len = chosen.str.len().astype("float64")
    rejected_len = rejected.str.len().astype("float64").clip(lower=1.0)
    return (chosen_len / rejected_len).where(both)


def _pair_tokens(texts: dict[str, pd.Series], tokenizer: Any, max_length: int) -> pd.Series:
    """Longest of prompt+chosen and prompt+rejected, in tokens (NaN for non-text rows)."""
    limit = (max_length + 1) * TOKENIZE_CHARS_PER_TOKEN
    counts = {c: _token_counts(texts[c], tokenizer, limit) for c in TEXT_COLUMNS}
    longest = pd.concat([counts["chosen"], counts["rejected"]], axis=1).max(axis=1, skipna=False)
    return (counts["prompt"] + longest).astype("float64")


def _token_counts(text: pd.Series, tokenizer: Any, limit: int) -> pd.Series:
    mask = text.notna()
    clipped = text[mask].str.slice(0, limit).tolist()
    counts = pd.Series(float("nan"), index=text.index, dtype="float64")
    if clipped:
        ids = tokenizer(clipped, add_special_tokens=False)["input_ids"]
        counts[mask] = [float(len(i)) for i in ids]
    return counts


# --------------------------------------------------------------------------- expectations


Spec = tuple[Any, dict[str, str]]  # (GX expectation, meta: check, column, detail)


def _expectation_specs(
    frame: pd.DataFrame,
    df: pd.DataFrame,
    min_rows: int,
    eval_prompts: list[str] | None,
    max_length: int | None,
    max_length_ratio: float,
) -> list[Spec]:
    """Build (expectation, meta) pairs; only for columns that exist, so none can crash."""
    import great_expectations as gx

    E = gx.expectations
    specs: list[Spec] = [
        (
            E.ExpectTableRowCountToBeBetween(min_value=min_rows),
            _meta("min_rows", "", f"fewer than {min_rows} row(s)"),
        ),
    ]
    present = [c for c in TEXT_COLUMNS if c in df.columns]
    for column in TEXT_COLUMNS:
        specs.append((E.ExpectColumnToExist(column=column), _meta("required_columns", column)))
    for c in present:
        specs += [
            (E.ExpectColumnValuesToNotBeNull(column=c), _meta("not_null", c)),
            (E.ExpectColumnValuesToBeOfType(column=c, type_="str"), _meta("is_text", c)),
            (
                E.ExpectColumnValueLengthsToBeBetween(column=f"{c}__stripped", min_value=1),
                _meta("not_empty", c),
            ),
            (
                E.ExpectColumnValuesToNotMatchRegex(column=c, regex=CONTROL_CHARS),
                _meta("no_control_chars", c),
            ),
        ]
    if {"chosen", "rejected"} <= set(present):
        specs.append(
            (
                E.ExpectSelectColumnValuesToBeUniqueWithinRecord(
                    column_list=["chosen__stripped", "rejected__stripped"]
                ),
                _meta("chosen_differs", "chosen, rejected"),
            )
        )
    if set(TEXT_COLUMNS) <= set(present):
        specs.append(
            (
                E.ExpectCompoundColumnsToBeUnique(
                    column_list=[f"{c}__stripped" for c in TEXT_COLUMNS]
                ),
                _meta("unique_rows", "prompt, chosen, rejected"),
            )
        )
    if "prompt__normalised" in frame.columns:
        leaked = sorted({" ".join(str(p).split()) for p in eval_prompts or []})
        specs.append(
            (
                E.ExpectColumnValuesToNotBeInSet(column="prompt__normalised", value_set=leaked),
                _meta("no_eval_leakage", "prompt"),
            )
        )
    if "__pair_tokens" in frame.columns:
        specs.append(
            (
                E.ExpectColumnValuesToBeBetween(column="__pair_tokens", max_value=max_length),
                _meta(
                    "max_length",
                    "prompt + chosen/rejected",
                    f"prompt + answer longer than {max_length} tokens",
                ),
            )
        )
    if "__length_ratio" in frame.columns and frame["__length_ratio"].notna().any():
        low, high = 1.0 / max_length_ratio, max_length_ratio
        specs.append(
            (
                E.ExpectColumnMeanToBeBetween(
                    column="__length_ratio", min_value=low, max_value=high
                ),
                _meta(
                    "length_ratio",
                    "chosen, rejected",
                    f"mean chosen/rejected length ratio out of [{low:.3g}, {high:.3g}]",
                ),
            )
        )
    return specs


def _token_specs(
    truncation: Truncation, max_length: int | None, max_truncated_share: float
) -> list[Spec]:
    """The token-boundary checks (see `token_checks`), on the rows training will build."""
    import great_expectations as gx

    E = gx.expectations
    specs: list[Spec] = [
        (
            E.ExpectColumnValuesToBeInSet(column=f"__token_{name}", value_set=[True]),
            _meta(check, column),
        )
        for name, check, column in (
            ("prefix", "prompt_token_prefix", "prompt"),
            ("bos", "one_bos", "prompt, chosen, rejected"),
            ("eos", "one_eos", "chosen, rejected"),
            ("answer_left", "answer_left_after_truncation", "chosen, rejected"),
        )
    ]
    cut = (
        f"{truncation.count} of {truncation.answers} answers ({truncation.share:.1%}) are cut "
        f"at max_length {max_length} tokens (data.max_truncated_share allows "
        f"{max_truncated_share:g}); the longest prompt + answer is {truncation.longest} tokens"
    )
    specs.append(
        (
            E.ExpectColumnMeanToBeBetween(
                column="__token_truncated", min_value=0, max_value=max_truncated_share
            ),
            _meta("truncated_share", "chosen, rejected", cut),
        )
    )
    return specs


def _meta(check: str, column: str, detail: str | None = None) -> dict[str, str]:
    return {"check": check, "column": column, "detail": detail or CHECKS[check].problem}


def _run_gx(frame: pd.DataFrame, expectations: list, report_dir: pathlib.Path | None) -> list:
    """Run the expectations in an ephemeral GX context; Data Docs go to report_dir."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # On import GX sets this logger to INFO, which announces a temporary folder for a docs site
    # it builds only when asked (ours go to report_dir): one line of noise per validation.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        ctx.data_sources.add_pandas(name="preferences")
        .add_dataframe_asset(name="pairs")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name="preference_data"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="preference_data", data=batch, suite=suite)
    )
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
    if report_dir is None:
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        return _in_suite_order(result.results, suite)
    return _run_with_docs(ctx, definition, frame, result_format, pathlib.Path(report_dir), suite)


def _run_with_docs(ctx, definition, frame, result_format, report_dir: pathlib.Path, suite) -> list:
    import great_expectations as gx

    report_dir.mkdir(parents=True, exist_ok=True)
    site = "preference_docs"
    ctx.add_data_docs_site(
        site_name=site,
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(report_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="preference_gate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[site])],
            result_format=result_format,
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = result.run_results.values()
    return _in_suite_order(validation.results, suite)


def _in_suite_order(results: list, suite) -> list:
    """GX may reorder results; match them back to the expectations by id."""
    by_id = {r.expectation_config.id: r for r in results}
    return [by_id[e.id] for e in suite.expectations]


def _outcome(result, meta: dict[str, str], levels: dict[str, str]) -> ExpectationOutcome:
    details = result.result or {}
    detail = meta["detail"]
    if result.success:  # the check's wording names the problem: say it was not found
        detail = f"passed (it would fail on: {detail})"
    info = result.exception_info or {}
    if info.get("raised_exception"):
        detail = f"{detail} (GX could not evaluate it: {info.get('exception_message')})"
    elif not result.success and "observed_value" in details:
        detail = f"{detail} (observed {_observed(details['observed_value'])})"
    count = details.get("unexpected_count") or 0  # table-level expectations have none
    return ExpectationOutcome(
        name=result.expectation_config.type,
        column=meta["column"],
        severity=levels[meta["check"]],
        success=bool(result.success),
        unexpected_count=int(count),
        examples=[int(i) for i in details.get("partial_unexpected_index_list") or []][
            :MAX_EXAMPLES
        ],
        detail=detail,
        check=meta["check"],
    )


def _observed(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# --------------------------------------------------------------------------- CLI table


def render_failures_table(report: ValidationReport) -> Table:
    """A rich table of the failed expectations, errors first, for the CLI."""
    from rich.table import Table

    table = Table(title=f"Data validation: {report.n_rows} rows", show_lines=False)
    for header in ("expectation", "column", "severity", "unexpected", "example rows"):
        table.add_column(header)
    styles: dict[str, Callable[[str], str]] = {
        "error": lambda s: f"[red]{s}[/red]",
        "warning": lambda s: f"[yellow]{s}[/yellow]",
    }
    for outcome in report.failures():
        style = styles.get(outcome.severity, str)
        table.add_row(
            f"{outcome.name}\n({outcome.check})",
            outcome.column or "(table)",
            style(outcome.severity),
            str(outcome.unexpected_count),
            ", ".join(str(r) for r in outcome.examples) or "-",
        )
    return table
