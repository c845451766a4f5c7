"""The registered text generator: logged without pickles, loaded back from the registry
without dpoflow, answering as `dpoflow.models.generation.generate` does; and `load_generator`,
which takes only its weights."""

from __future__ import annotations

import ast
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

from dpoflow.data_checks.loading import _chat_renderer, load_prompts
from dpoflow.errors import ModelError
from dpoflow.models import served_model
from dpoflow.models.generation import generate, load_causal_lm
from dpoflow.models.serving import log_generator
from dpoflow.tasks.promote import load_generator
from tests.test_evaluation import PROMPTS, make_tokenizer, save_tiny_model

NAME = "served"
# Prompts the tiny random model answers with words at every setting used below (it also
# writes ids beyond its tokenizer's vocabulary, which decode to nothing).
ANSWERED = ["this movie was", "what a wonderful story with great actors"]


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """One tiny policy, logged with log_generator and registered as version 1 of NAME."""
    tmp = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)  # keep anything MLflow writes by default inside tmp
        model_dir = save_tiny_model(tmp / "policy")
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        try:
            experiment = mlflow.create_experiment(
                "serving-test", artifact_location=(tmp / "artifacts").as_uri()
            )
            with mlflow.start_run(experiment_id=experiment):
                info = log_generator(str(model_dir), name="policy", chat_template="auto")
            version = mlflow.register_model(info.model_uri, NAME).version
            stored = next((tmp / "artifacts").rglob("MLmodel")).parent
            yield SimpleNamespace(
                model_dir=model_dir,
                version=str(version),
                uri=f"models:/{NAME}/{version}",
                stored=stored,
            )
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def loaded(registered):
    """The registered model loaded with `dpoflow` unimportable, as on a serving-only host."""
    with pytest.MonkeyPatch.context() as patch:
        # `import dpoflow...` raises ImportError while the entry is None.
        for module in [m for m in sys.modules if m == "dpoflow" or m.startswith("dpoflow.")]:
            patch.setitem(sys.modules, module, None)
        return mlflow.pyfunc.load_model(registered.uri)


def texts(loaded, prompts: list[str], **settings) -> list[str]:
    output = loaded.predict(pd.DataFrame({"prompt": prompts}).assign(**settings))
    assert isinstance(output, pd.DataFrame)
    assert list(output.columns) == ["text", "prompt_tokens", "completion_tokens", "finish_reason"]
    return output["text"].tolist()


def test_the_stored_model_is_code_and_weights_with_no_pickle(registered):
    files = sorted(
        p.relative_to(registered.stored).as_posix() for p in registered.stored.rglob("*")
    )
    print("\nstored model:", *files, sep="\n  ")
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".bin", ".pt", ".pth"))]
    assert "served_model.py" in files and "artifacts/policy/model.safetensors" in files
    mlmodel = (registered.stored / "MLmodel").read_text()
    pyfunc = yaml.safe_load(mlmodel)["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    # No `python_model` entry (the cloudpickle file's name); MLflow still notes its
    # cloudpickle_version as an installed package, which loads nothing.
    assert "python_model" not in pyfunc and pyfunc["model_code_path"].endswith("served_model.py")
    # The stored file imports the serving stack and the standard library only, no dpoflow.
    tree = ast.parse((registered.stored / "served_model.py").read_text())
    imported = {
        alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
    }
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    top = {name.split(".")[0] for name in imported} - set(sys.stdlib_module_names)
    # (peft is imported inside the adapter branch only: a merged model never loads it.)
    assert top == {"mlflow", "pandas", "peft", "torch", "transformers"}


def test_the_registered_model_loads_without_dpoflow_and_answers_with_text(loaded):
    assert loaded.metadata.get_input_schema().input_names() == [
        "prompt",
        "messages",
        "max_new_tokens",
        "temperature",
    ]
    answers = texts(loaded, ANSWERED, max_new_tokens=8, temperature=0.0)
    assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers)


def test_answers_are_those_of_dpoflow_generate(loaded, registered):
    """The served file's self-contained sampling matches the pipeline's, greedy and sampled."""
    model, tokenizer = load_causal_lm(str(registered.model_dir))
    for temperature in (0.0, 1.0):
        expected = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=temperature)
        assert texts(loaded, PROMPTS, max_new_tokens=8, temperature=temperature) == expected


def test_max_new_tokens_bounds_the_answer(loaded):
    # The word-level tokenizer writes one word per token at most.
    short = texts(loaded, PROMPTS, max_new_tokens=3, temperature=0.0)
    long = texts(loaded, PROMPTS, max_new_tokens=12, temperature=0.0)
    assert all(len(answer.split()) <= 3 for answer in short)
    assert sum(len(a.split()) for a in long) > sum(len(a.split()) for a in short)


def test_temperature_zero_is_deterministic_and_differs_from_sampling(loaded):
    greedy = texts(loaded, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert texts(loaded, PROMPTS, max_new_tokens=8, temperature=0.0) == greedy
    sampled = texts(loaded, PROMPTS, max_new_tokens=8, temperature=1.0)
    assert sampled != greedy
    # A fixed seed per request: the same sampled request gets the same answers, whatever the
    # process sampled in between (here: a global RNG moved elsewhere).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        assert texts(loaded, PROMPTS, max_new_tokens=8, temperature=1.0) == sampled


@contextmanager
def replaced(path: Path, text: str) -> Iterator[None]:
    """`path` holds `text` inside the block, its own content again after."""
    original = path.read_text()
    path.write_text(text)
    try:
        yield
    finally:
        path.write_text(original)


def test_load_generator_takes_the_weights_and_runs_no_stored_code(registered):
    with replaced(registered.stored / "served_model.py", "raise RuntimeError('stored code ran')"):
        with pytest.raises(MlflowException, match="stored code ran"):
            mlflow.pyfunc.load_model(registered.uri)  # the tampering is real...
        model, tokenizer = load_generator(NAME, registered.version)  # ...and never runs here
    expected, _ = load_causal_lm(str(registered.model_dir))
    assert tokenizer.pad_token_id is not None and not model.training
    for key, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_load_generator_refuses_a_model_without_the_weights_folder(registered):
    mlmodel = registered.stored / "MLmodel"
    escaping = mlmodel.read_text().replace("path: artifacts/policy", "path: ../../policy")
    assert escaping != mlmodel.read_text()
    with replaced(mlmodel, escaping):
        with pytest.raises(ModelError, match="not logged by dpoflow's log_generator: register"):
            load_generator(NAME, registered.version)


CHAT = [
    {"role": "system", "content": "a fine movie"},
    {"role": "user", "content": "what a wonderful story"},
]


def test_the_input_example_shows_both_request_shapes_and_is_answered(loaded, registered):
    example = json.loads((registered.stored / "serving_input_example.json").read_text())
    rows = example["dataframe_split"]
    shapes = [dict(zip(rows["columns"], row, strict=True)) for row in rows["data"]]
    assert [s["prompt"] is not None for s in shapes] == [True, False]
    assert [s["messages"] is not None for s in shapes] == [False, True]
    answers = loaded.predict(pd.read_json(io.StringIO(json.dumps(rows)), orient="split"))
    assert len(answers) == 2


def test_chat_messages_are_answered_as_their_rendered_prompt_with_token_counts(loaded):
    """A chat is the plain prompt the pipeline trains chats as (this tokenizer has no chat
    template); the counts are the prompt's ids with bos and the new ids through eos."""
    rendered, _ = _chat_renderer(None)(CHAT)
    settings = {"max_new_tokens": 6, "temperature": 0.0}
    chat = loaded.predict(pd.DataFrame({"messages": [CHAT]}).assign(**settings))
    plain = loaded.predict(pd.DataFrame({"prompt": [rendered]}).assign(**settings))
    assert chat.to_dict("records") == plain.to_dict("records")
    row = chat.iloc[0]
    tokenizer = make_tokenizer()
    assert row["prompt_tokens"] == 1 + len(tokenizer.encode(rendered, add_special_tokens=False))
    assert 1 <= row["completion_tokens"] <= 6
    assert row["finish_reason"] == ("length" if row["completion_tokens"] == 6 else "stop")


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_chat_template_renders_messages_as_the_pipeline_renders_them():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = TEMPLATE
    for templated in (True, False):
        expected, _ = _chat_renderer(tokenizer if templated else None)(CHAT)
        assert served_model._render_chat(tokenizer, CHAT, templated) == expected
    # The template wrote bos; encoding does not add a second one.
    ids = served_model._encode(tokenizer, served_model._render_chat(tokenizer, CHAT, True))
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_requests_are_rendered_as_the_model_was_trained(tmp_path, monkeypatch):
    """A tokenizer with a chat template: trained with data.chat_template auto, the model saw
    (and evaluation sampled) each plain prompt as one user turn, so it is served that way; a
    model trained with `never` continues a plain prompt as is and reads a chat as plain lines.
    The mode travels in the logged model's config."""
    model_dir = save_tiny_model(tmp_path / "policy")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model_dir)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ANSWERED))
    monkeypatch.chdir(tmp_path)  # anything MLflow writes by default stays in tmp_path
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        experiment = mlflow.create_experiment("rendering", artifact_location=tmp_path.as_uri())
        with mlflow.start_run(experiment_id=experiment):
            served = {
                mode: mlflow.pyfunc.load_model(
                    log_generator(str(model_dir), name=mode, chat_template=mode).model_uri
                )
                for mode in ("auto", "never")
            }
    finally:
        mlflow.set_tracking_uri(None)
    model, loaded_tokenizer = load_causal_lm(str(model_dir))
    templated = load_prompts(str(prompts_file), tokenizer=loaded_tokenizer, chat_template="auto")
    settings = {"max_new_tokens": 8, "temperature": 0.0}
    for mode, rendered in (("auto", templated["prompt"].tolist()), ("never", ANSWERED)):
        answers = served[mode].predict(pd.DataFrame({"prompt": ANSWERED}).assign(**settings))
        expected = generate(model, loaded_tokenizer, rendered, **settings)
        assert answers["text"].tolist() == expected, mode
        ids = [served_model._encode(loaded_tokenizer, prompt) for prompt in rendered]
        assert answers["prompt_tokens"].tolist() == [len(i) for i in ids], mode
    assert templated["prompt"][0] == f"<s><|user|>{ANSWERED[0]}<|assistant|>"

    for mode, chat in (("auto", _chat_renderer(loaded_tokenizer)), ("never", _chat_renderer(None))):
        answer = served[mode].predict(pd.DataFrame({"messages": [CHAT]}).assign(**settings))
        prompt = chat(CHAT)[0]
        assert answer["text"].tolist() == generate(model, loaded_tokenizer, [prompt], **settings)
        assert answer["prompt_tokens"][0] == len(served_model._encode(loaded_tokenizer, prompt))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "messages": CHAT}, "exactly one of 'prompt'.*got both"),
        ({"prompt": None, "messages": None}, "got neither"),
        ({"messages": []}, "'messages' is empty"),
    ],
)
def test_a_malformed_row_is_refused_with_what_to_send(loaded, row, message):
    with pytest.raises(MlflowException, match=message):
        loaded.predict(pd.DataFrame([row]))


def test_chat_requests_name_a_bounded_whole_number_of_tokens():
    from dpoflow.models.chat_completions import (
        DEFAULT_MAX_TOKENS,
        MAX_TOKENS,
        ChatRequestError,
        request_frame,
    )

    chat = [{"role": "user", "content": "Hi"}]

    def tokens(**body) -> int:
        return int(request_frame({"messages": chat, **body})["max_new_tokens"].iloc[0])

    assert tokens() == DEFAULT_MAX_TOKENS
    assert tokens(max_tokens=7) == 7
    assert tokens(max_completion_tokens=5, max_tokens=7) == 5  # the current name wins
    for bad in (0, MAX_TOKENS + 1, "12", 2.5, True):
        with pytest.raises(ChatRequestError, match="max_completion_tokens must be"):
            request_frame({"messages": chat, "max_completion_tokens": bad})
