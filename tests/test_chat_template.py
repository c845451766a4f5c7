"""data.chat_template and the token-boundary checks, on a small byte-level BPE tokenizer
built offline (the embedded model's kind) with a ChatML template that writes its own bos."""

from __future__ import annotations

import copy
from functools import partial

import pandas as pd
import pytest

from dpoflow.data_checks.loading import load_preferences, load_prompts
from dpoflow.data_checks.suite import validate_preferences
from dpoflow.errors import ConfigError
from dpoflow.models.logprobs import prompt_token_ids, tokenize_example

# Writes the bos text itself, as Llama 3's and others' templates do.
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROWS = [
    {"prompt": f"Tell me about film {i}.", "chosen": f"A fine film, {i} stars.", "rejected": "Bad."}
    for i in range(8)
]
LIMITS = dict(max_length=48, max_prompt_length=32)


@pytest.fixture(scope="module")
def plain():
    """Byte-level BPE with <s>, </s>, <pad>: like the embedded tiny Llama's, no template."""
    from dpoflow.models.tiny_llama import _train_tokenizer

    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in ROWS] * 4
    tokenizer = _train_tokenizer(texts, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


@pytest.fixture(scope="module")
def chat(plain):
    tokenizer = copy.deepcopy(plain)
    tokenizer.chat_template = CHATML
    return tokenizer


def write(tmp_path, rows: list[dict]):
    path = tmp_path / "pairs.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return str(path)


def check(report, name: str):
    (outcome,) = [o for o in report.outcomes if o.check == name]
    return outcome


def validate(tokenizer, rows: list[dict], *, templated: bool = False, **kwargs):
    frame = pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=object) for k in rows[0]})
    return validate_preferences(
        frame,
        tokenizer=tokenizer,
        max_length=LIMITS["max_length"],
        tokenize=partial(tokenize_example, tokenizer, **LIMITS),
        templated=templated,
        **kwargs,
    )


def test_auto_renders_plain_prompts_as_one_user_turn_only_with_a_template(chat, plain, tmp_path):
    path = write(tmp_path, ROWS)
    rendered = load_preferences(path, tokenizer=chat)["prompt"].tolist()
    turn = [{"role": "user", "content": ROWS[0]["prompt"]}]
    expected = chat.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    assert rendered[0] == expected and expected.startswith("<s><|im_start|>user\n")
    # The evaluation prompts go through the same rendering.
    assert load_prompts(path, tokenizer=chat)["prompt"].tolist()[0] == expected
    # No template (the embedded tokenizer), or `never`: the prompts stay as written.
    for tokenizer, mode in ((plain, "auto"), (chat, "never")):
        kept = load_preferences(path, tokenizer=tokenizer, chat_template=mode)["prompt"]
        assert kept.tolist() == [r["prompt"] for r in ROWS]


def test_always_without_a_template_is_one_config_error(plain, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.chat_template is 'always' but .*: set "):
        load_preferences(write(tmp_path, ROWS), tokenizer=plain, chat_template="always")


def test_a_rendered_prompt_that_writes_its_own_bos_gets_one(chat):
    prompt = chat.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = prompt_token_ids(chat, prompt)
    assert ids[0] == chat.bos_token_id and ids[1] != chat.bos_token_id
    prompt_ids, _ = tokenize_example(chat, prompt, "Hello.", **LIMITS)
    assert prompt_ids.count(chat.bos_token_id) == 1


def test_rendered_clean_data_passes_every_token_check(chat, tmp_path):
    pairs = load_preferences(write(tmp_path, ROWS), tokenizer=chat)
    report = validate(chat, pairs.to_dict("records"), templated=True)
    names = ("prompt_token_prefix", "one_bos", "one_eos", "answer_left_after_truncation")
    assert all(check(report, n).success for n in (*names, "truncated_share")), report.failures()


def test_prompt_tokens_that_merge_with_the_answer_fail(plain):
    rows = [dict(r) for r in ROWS]
    # A trailing space: " film" tokenized whole is one token, not " " then "film".
    rows[2]["prompt"], rows[2]["chosen"] = "Tell me about a fine ", "film, 2 stars."
    outcome = check(validate(plain, rows), "prompt_token_prefix")
    assert not outcome.success and outcome.examples == [2] and outcome.severity == "error"


def test_a_second_bos_fails(plain):
    rows = [dict(r) for r in ROWS]
    rows[3]["chosen"] = "<s>" + rows[3]["chosen"]
    outcome = check(validate(plain, rows), "one_bos")
    assert not outcome.success and outcome.examples == [3]


def test_an_answer_with_its_own_eos_fails(plain):
    rows = [dict(r) for r in ROWS]
    rows[4]["rejected"] = "Bad.</s>"
    outcome = check(validate(plain, rows), "one_eos")
    assert not outcome.success and outcome.examples == [4]


def test_an_answer_of_special_tokens_only_fails(plain):
    rows = [dict(r) for r in ROWS]
    rows[5]["rejected"] = "<pad>"
    outcome = check(validate(plain, rows), "answer_left_after_truncation")
    assert not outcome.success and outcome.examples == [5]


def test_truncated_answers_are_counted_and_fail_above_the_share(plain):
    rows = [dict(r) for r in ROWS]
    for row in rows[:2]:
        row["chosen"] = "A fine film. " * 20
    report = validate(plain, rows, max_truncated_share=0.1)
    outcome = check(report, "truncated_share")
    assert not outcome.success and outcome.severity == "error"
    assert "2 of 16 answers (12.5%) are cut at max_length 48 tokens" in report.summary_message()
    assert "the longest prompt + answer is" in outcome.detail
    assert check(validate(plain, rows, max_truncated_share=0.2), "truncated_share").success
