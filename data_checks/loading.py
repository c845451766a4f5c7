"""Read preference data in the formats people have and normalise it once.

Everything downstream (validation, SFT, DPO, evaluation) sees one internal form: a
DataFrame with columns ``id``, ``prompt``, ``chosen`` and ``rejected``. Normalising in one
place means the trainers never guess at shapes.

Loading deliberately does NOT coerce bad values (numbers, lists, dicts, None/NaN where
text is expected): they are kept as they are so that the validation suite can name the
rows. Loading only raises for what the suite cannot see: a missing or unreadable file,
a wrong format, missing columns, zero rows.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from dpoflow.data_checks.sources import require_source
from dpoflow.errors import ConfigError, DataError

INTERNAL_COLUMNS = ("id", "prompt", "chosen", "rejected")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
HH_MARKER = "\n\nAssistant:"
FILE_FORMATS = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}


# --------------------------------------------------------------------------- public API


def load_preferences(
    source: str,
    *,
    split: str = "train",
    revision: str | None = None,
    columns: dict[str, str] | None = None,
    tokenizer: Any = None,
    chat_template: str = "auto",
) -> pd.DataFrame:
    """Load preference pairs from a file, a ``save_to_disk`` folder or a hub dataset.

    ``columns`` maps internal names to source names, e.g. ``{"prompt": "question"}``.
    ``tokenizer`` (optional) with ``chat_template`` (data.chat_template) renders prompts with
    its chat template (see `uses_chat_template`).
    Returns a DataFrame with ``id``, ``prompt``, ``chosen``, ``rejected`` (object dtype,
    raw values kept where they are not text so that validation can report them).
    """
    raw = _require_rows(read_table(source, split=split, revision=revision), source)
    templated = uses_chat_template(tokenizer, chat_template)
    return _normalise_pairs(_rename_columns(raw, columns, source), source, tokenizer, templated)


def load_prompts(
    source: str, *, column: str = "prompt", tokenizer: Any = None, chat_template: str = "auto"
) -> pd.DataFrame:
    """Load evaluation prompts as a DataFrame with ``id``, ``prompt`` and, where the source
    has one, ``chosen`` (the dataset's preferred answer, None where it is not text).

    Accepts the same formats as :func:`load_preferences`; a preference file is accepted
    too and its unique prompts are taken, so the same data can feed training and eval.
    Prompts are rendered as the training pairs are (``tokenizer``, ``chat_template``), so
    evaluation samples from the prompts the policy was trained on.
    """
    raw = _require_rows(read_table(source, named_by="data.eval_prompts in your config"), source)
    templated = uses_chat_template(tokenizer, chat_template)
    if column in raw.columns:
        prompts = pd.Series(raw[column].tolist(), dtype=object)
        if templated:
            render = _chat_renderer(tokenizer)
            prompts = prompts.map(lambda p: render(_prompt_messages(p))[0] if _is_str(p) else p)
        ids = _ids_for(raw, [prompts])
        frame = pd.DataFrame({"id": ids, "prompt": prompts}, dtype=object)
        if "chosen" in raw.columns:  # kept for the win rate against the dataset's answers
            frame["chosen"] = [c if isinstance(c, str) else None for c in raw["chosen"]]
    elif {"chosen", "rejected"} <= set(raw.columns):
        pairs = _normalise_pairs(raw, source, tokenizer, templated)
        pairs = pairs[~pairs["prompt"].map(_as_key).duplicated()].reset_index(drop=True)
        frame = pd.DataFrame(
            {
                "id": _ids_for(pd.DataFrame(), [pairs["prompt"]]),
                "prompt": pairs["prompt"],
                "chosen": pairs["chosen"],
            }
        )
    else:
        raise DataError(
            f"prompt source '{source}' has no column '{column}' "
            f"(found: {_names(raw.columns)}): rename the column or set its name "
            "in the config (eval.prompt_column)."
        )
    return frame.drop_duplicates(subset="id").reset_index(drop=True)


def example_id(prompt: Any, chosen: Any = "", rejected: Any = "") -> str:
    """Stable id of an example: sha256 of its texts, 16 hex characters.

    The texts are joined with a unit separator so that ("ab", "c") and ("a", "bc") differ.
    """
    text = "\x1f".join(_as_key(v) for v in (prompt, chosen, rejected))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def read_table(
    source: str,
    *,
    split: str = "train",
    revision: str | None = None,
    named_by: str = "data.train in your config",
) -> pd.DataFrame:
    """Read any supported source into a raw DataFrame (source column names, raw values);
    `named_by` says where the user wrote a source that does not exist."""
    require_source(source, named_by=named_by)
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.is_file():
        return _read_file(path)
    return _read_hub(source, split, revision)


def _require_rows(raw: pd.DataFrame, source: str) -> pd.DataFrame:
    """Zero rows is checked first: an empty file has no columns to complain about either."""
    if len(raw) == 0:
        raise DataError(
            f"data source '{source}' has no rows: add examples to it "
            "or point the config at a non-empty file."
        )
    return raw


# --------------------------------------------------------------------------- file readers


def _read_file(path: Path) -> pd.DataFrame:
    readers: dict[str, Callable[[Path], pd.DataFrame]] = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"data file '{path}' has an unsupported extension '{path.suffix}': "
            "use .jsonl, .json, .csv, .parquet or a datasets save_to_disk folder."
        )
    return reader(path)


def _decode_utf8(path: Path) -> str:
    """Decode strictly: silently replacing bad bytes would corrupt training text."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"data file '{path}' is not valid UTF-8 (byte offset {exc.start}, line {line}): "
            "re-save it as UTF-8 (e.g. iconv -t UTF-8) and load it again."
        ) from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    text = _decode_utf8(path)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"data file '{path}' is not valid JSON Lines (line {number}, column "
                f"{exc.colno}: {exc.msg}): write one JSON object per line or rename the file "
                "to its real format."
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"data file '{path}' line {number} is a JSON {type(record).__name__}, "
                "not an object: write one JSON object per line."
            )
        records.append(record)
    return _records_frame(records)


def _read_json(path: Path) -> pd.DataFrame:
    text = _decode_utf8(path)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (it looks like JSON Lines: rename it to .jsonl)" if exc.msg == "Extra data" else ""
        raise DataError(
            f"data file '{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}){hint}: fix the file or rename it to its real format."
        ) from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(
            f"data file '{path}' holds a JSON {type(payload).__name__}, not a list of records: "
            'write a list of objects or {"data": [...]}.'
        )
    for index, record in enumerate(payload):
        if not isinstance(record, dict):
            raise DataError(
                f"data file '{path}' record {index} is a JSON {type(record).__name__}, "
                "not an object: make every record an object with prompt/chosen/rejected."
            )
    return _records_frame(payload)


def _read_csv(path: Path) -> pd.DataFrame:
    """Read every cell as text; empty cells stay '' so that the suite reports them."""
    text = _decode_utf8(path)
    try:
        return pd.read_csv(io.StringIO(text), dtype=object, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(
            f"data file '{path}' is not a readable CSV file ({_first_line(exc)}): "
            "fix the file or rename it to its real format."
        ) from None


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"data file '{path}' is not a readable Parquet file ({_first_line(exc)}): "
            "rewrite it with pandas.DataFrame.to_parquet or rename it to its real format."
        ) from None
    return _records_frame(table.to_pylist(), columns=table.column_names)


def _read_saved_dataset(path: Path, split: str) -> pd.DataFrame:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(
            f"data folder '{path}' is not a dataset written by datasets' save_to_disk "
            f"({_first_line(exc)}): pass a data file or a save_to_disk folder."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"data folder '{path}' has no split '{split}' (found: {_names(loaded.keys())}): "
                "set data.split to one of those."
            )
        loaded = loaded[split]
    return _records_frame(loaded.to_list(), columns=loaded.column_names)


def _read_hub(name: str, split: str, revision: str | None) -> pd.DataFrame:
    """Load a hub dataset; needs the network or a populated datasets cache."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - the hub raises many unrelated types
        raise DataError(
            f"hub dataset '{name}' (split '{split}') could not be loaded ({_first_line(exc)}): "
            "check the name, split and revision, your network, or pass a local file."
        ) from None
    return _records_frame(loaded.to_list(), columns=loaded.column_names)


def _records_frame(records: list[dict], columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Build an object-dtype frame so that pandas infers nothing (no silent coercion)."""
    names = list(columns) if columns is not None else _union_keys(records)
    data = {name: pd.Series([r.get(name) for r in records], dtype=object) for name in names}
    return pd.DataFrame(data, columns=names)


def _union_keys(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    return list(seen)


# --------------------------------------------------------------------------- columns


def _rename_columns(raw: pd.DataFrame, columns: dict[str, str] | None, source: str) -> pd.DataFrame:
    if not columns:
        return raw
    unknown = sorted(set(columns) - set(INTERNAL_COLUMNS))
    if unknown:
        raise ConfigError(
            f"data.columns has unknown key(s) {_names(unknown)}: use only "
            f"{_names(INTERNAL_COLUMNS)} as keys, mapped to the column names in your data."
        )
    missing = [src for src in columns.values() if src not in raw.columns]
    if missing:
        raise DataError(
            f"data source '{source}' has no column(s) {_names(missing)} named in data.columns "
            f"(found: {_names(raw.columns)}): fix the mapping in data.columns."
        )
    # Drop source columns that would collide with a mapped internal name.
    clashes = [k for k in columns if k in raw.columns and columns[k] != k]
    raw = raw.drop(columns=[c for c in clashes if c not in columns.values()])
    return raw.rename(columns={src: internal for internal, src in columns.items()})


def _check_required(raw: pd.DataFrame, source: str, implicit_prompt: bool) -> None:
    required = ["chosen", "rejected"] if implicit_prompt else list(TEXT_COLUMNS)
    missing = [name for name in required if name not in raw.columns]
    if missing:
        raise DataError(
            f"data source '{source}' is missing column(s) {_names(missing)} "
            f"(found: {_names(raw.columns)}): rename them in the data or map them with "
            "data.columns, e.g. data.columns: {prompt: question, chosen: good}."
        )


# --------------------------------------------------------------------------- shapes


def uses_chat_template(tokenizer: Any, mode: str) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template (data.chat_template).

    ``auto``: when the tokenizer has one; ``always``: it must have one; ``never``: plain text
    (message lists then become "role: text" lines). Rendered, a plain prompt string is one user
    turn followed by the assistant's opening, and a message list its history.
    """
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise ConfigError(
            "data.chat_template is 'always' but the model's tokenizer has no chat template: "
            "set data.chat_template to auto or never, or use a model whose tokenizer has one."
        )
    return has_template and mode != "never"


def _normalise_pairs(
    raw: pd.DataFrame, source: str, tokenizer: Any, templated: bool
) -> pd.DataFrame:
    has_prompt = "prompt" in raw.columns
    chosen_values = raw["chosen"].tolist() if "chosen" in raw.columns else []
    conversational = any(_is_messages(v) for v in chosen_values)
    hh = not has_prompt and any(isinstance(v, str) and HH_MARKER in v for v in chosen_values)
    _check_required(raw, source, implicit_prompt=conversational or hh)

    prompts = raw["prompt"].tolist() if has_prompt else [None] * len(raw)
    rows = zip(prompts, chosen_values, raw["rejected"].tolist(), strict=True)
    render = _chat_renderer(tokenizer if templated else None)
    if conversational:
        triples = [_split_conversation(p, c, r, render) for p, c, r in rows]
    elif hh:
        triples = [_split_hh(c, r) for _, c, r in rows]
    elif templated:  # plain prompt strings: one user turn
        triples = [(render(_prompt_messages(p))[0] if _is_str(p) else p, c, r) for p, c, r in rows]
    else:
        triples = list(rows)

    columns = list(zip(*triples, strict=True)) if triples else [(), (), ()]
    series = [pd.Series(list(values), dtype=object) for values in columns]
    ids = _ids_for(raw, series)
    frame = pd.DataFrame({"id": ids}, dtype=object)
    for name, values in zip(TEXT_COLUMNS, series, strict=True):
        frame[name] = values
    return frame


def _split_hh(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Anthropic HH: the prompt is the shared text up to the last '\\n\\nAssistant:'."""
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return None, chosen, rejected
    shared = _common_prefix_length(chosen, rejected)
    start = chosen.rfind(HH_MARKER, 0, shared)
    if start < 0:
        return "", chosen, rejected
    cut = start + len(HH_MARKER)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _common_prefix_length(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    # Compare in blocks first so that long shared dialogues stay cheap.
    low, step = 0, 4096
    while low < limit and a[low : low + step] == b[low : low + step]:
        low += step
    high = min(limit, low + step)
    while low < high and a[low] == b[low]:
        low += 1
    return low


def _is_messages(value: Any) -> bool:
    if isinstance(value, str) or not hasattr(value, "__len__") or isinstance(value, dict):
        return False
    try:
        return len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)
    except TypeError:
        return False


def _split_conversation(
    prompt: Any, chosen: Any, rejected: Any, render: Callable[[list[dict]], tuple[str, str]]
) -> tuple[Any, Any, Any]:
    """UltraFeedback-binarized: the last assistant message is the answer, the rest the prompt.

    Rows that are not well-formed message lists are returned unchanged so that the
    suite reports them instead of this code guessing.
    """
    chosen_split = _last_assistant(chosen)
    rejected_split = _last_assistant(rejected)
    if chosen_split is None or rejected_split is None:
        return prompt, chosen, rejected
    history = chosen_split[0]
    if not history:
        history = _prompt_messages(prompt)
        if history is None:
            return prompt, chosen, rejected
    if not all(isinstance(m.get("content"), str) for m in history):
        return prompt, chosen, rejected
    rendered_prompt, prefix = render(history)
    return rendered_prompt, prefix + chosen_split[1], prefix + rejected_split[1]


def _last_assistant(messages: Any) -> tuple[list[dict], str] | None:
    if not _is_messages(messages):
        return None
    messages = list(messages)
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return messages[:index], message["content"]
    return None


def _prompt_messages(prompt: Any) -> list[dict] | None:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if _is_messages(prompt):
        return list(prompt)
    return None


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _chat_renderer(tokenizer: Any) -> Callable[[list[dict]], tuple[str, str]]:
    """Return a function giving (prompt text, answer prefix) for a message history: the one
    rendering of every prompt (pairs and evaluation prompts), with the tokenizer's chat
    template when it is given one (`uses_chat_template` decides), else as plain lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):

        def render_template(history: list[dict]) -> tuple[str, str]:
            text = tokenizer.apply_chat_template(
                history, tokenize=False, add_generation_prompt=True
            )
            return text, ""

        return render_template

    def render_plain(history: list[dict]) -> tuple[str, str]:
        lines = "".join(f"{m['role']}: {m['content']}\n" for m in history)
        return lines + "assistant:", " "

    return render_plain


# --------------------------------------------------------------------------- ids & helpers


def _ids_for(raw: pd.DataFrame, texts: list[pd.Series]) -> pd.Series:
    """Use the source's id column where it has a value, else hash the texts."""
    source_ids = raw["id"].tolist() if "id" in raw.columns else [None] * len(texts[0])
    padded = texts + [pd.Series([""] * len(texts[0]), dtype=object)] * (3 - len(texts))
    ids = [
        str(sid) if _present(sid) else example_id(p, c, r)
        for sid, p, c, r in zip(source_ids, *padded, strict=True)
    ]
    return pd.Series(ids, dtype=object)


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN
        return False
    return str(value) != ""


def _as_key(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _names(names: Iterable[Any]) -> str:
    quoted = [f"'{n}'" for n in names]
    return ", ".join(quoted) if quoted else "none"


def _first_line(exc: BaseException) -> str:
    """The first clause of a library's message, so that ours stays one sentence."""
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
    return first[:200]
