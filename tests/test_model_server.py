"""`mlflow models serve -m models:/<name>@champion --env-manager local`, run from a fresh
virtual environment where dpoflow cannot be imported, answers both request shapes with text:
the pipeline's answers, bounded by max_new_tokens, greedy at temperature 0."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
import mlflow
import pytest

from dpoflow.data_checks.loading import _chat_renderer
from dpoflow.models.generation import generate, load_causal_lm
from dpoflow.models.serving import log_generator
from tests.servers import background, free_port
from tests.test_evaluation import PROMPTS, save_tiny_model

pytestmark = pytest.mark.slow

# The commands a fresh environment's `pip install mlflow` would put in its bin/: the
# function each one calls.
SCRIPTS = {"mlflow": ("mlflow.cli", "cli"), "uvicorn": ("uvicorn.main", "main")}
# Run in the fresh environment: the serving stack imports, dpoflow does not.
STACK_WITHOUT_DPOFLOW = """
import mlflow, torch, transformers
try:
    import dpoflow
except ImportError:
    print("no dpoflow")
"""


def serving_only_env(folder: Path) -> Path:
    """A new virtual environment that sees this venv's packages through a plain path line in
    a .pth file: .pth files in that path are not processed, so dpoflow's editable finder is
    not, and only the serving stack is importable. Returns its bin/ folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "serving_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name, (module, function) in SCRIPTS.items():
        script = folder / "bin" / name
        script.write_text(
            f"#!{python}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n"
        )
        script.chmod(0o755)
    out = subprocess.run(
        [python, "-c", STACK_WITHOUT_DPOFLOW], capture_output=True, text=True, cwd=folder
    )
    assert out.stdout.strip() == "no dpoflow", out.stdout + out.stderr
    return folder / "bin"


def test_served_champion_answers_invocations(tmp_path, monkeypatch, ephemeral_env):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model_dir = save_tiny_model(tmp_path / "policy")
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serve", artifact_location=(tmp_path / "a").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_generator(str(model_dir), chat_template="auto")
        version = mlflow.register_model(info.model_uri, "served").version
        mlflow.MlflowClient().set_registered_model_alias("served", "champion", version)
    finally:
        mlflow.set_tracking_uri(None)

    port = free_port()
    fresh = serving_only_env(tmp_path / "serving-env")
    cmd = [str(fresh / "mlflow"), "models", "serve", "-m", "models:/served@champion"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    # Only MLflow runs here, from the fresh environment (its `uvicorn` comes first on PATH).
    env = ephemeral_env | {"MLFLOW_TRACKING_URI": uri}
    env["PATH"] = f"{fresh}:{env['PATH']}"

    def answers(max_new_tokens: int, temperature: float) -> list[str]:
        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        request = {"dataframe_records": [{"prompt": p, **settings} for p in PROMPTS]}
        reply = httpx.post(f"http://127.0.0.1:{port}/invocations", json=request, timeout=60)
        assert reply.status_code == 200, reply.text
        print(f"\nPOST /invocations {json.dumps(request)[:120]}...\n-> {reply.text}")
        texts = [prediction["text"] for prediction in reply.json()["predictions"]]
        assert len(texts) == len(PROMPTS) and all(isinstance(text, str) for text in texts)
        return texts

    chat = [{"role": "user", "content": "what a wonderful story"}]
    with background(cmd, tmp_path / "serve.log", env, tmp_path, f"http://127.0.0.1:{port}/ping"):
        request = {"dataframe_records": [{"messages": chat, "max_new_tokens": 8, "temperature": 0}]}
        reply = httpx.post(f"http://127.0.0.1:{port}/invocations", json=request, timeout=60)
        assert reply.status_code == 200, reply.text
        print(f"\nPOST /invocations {json.dumps(request)}\n-> {reply.text}")
        (chat_answer,) = reply.json()["predictions"]
        greedy = answers(8, 0.0)
        greedy_again = answers(8, 0.0)
        sampled = answers(8, 1.0)
        short = answers(3, 0.0)

    # Text comes back, and it is the pipeline's own greedy answer to each prompt.
    assert sum(bool(text.strip()) for text in greedy) >= 3
    model, tokenizer = load_causal_lm(str(model_dir))
    assert greedy == generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0)
    # A chat is answered as its rendered prompt (no chat template here), with token counts.
    rendered, _ = _chat_renderer(None)(chat)
    expected = generate(model, tokenizer, [rendered], max_new_tokens=8, temperature=0.0)
    assert chat_answer["text"] == expected[0]
    assert chat_answer["prompt_tokens"] == 1 + len(
        tokenizer.encode(rendered, add_special_tokens=False)
    )
    assert 1 <= chat_answer["completion_tokens"] <= 8
    # Temperature 0 is deterministic; sampling answers otherwise.
    assert greedy_again == greedy and sampled != greedy
    # At most one word per token: 3 new tokens give 3 words at most, and fewer in all than 8.
    assert all(len(text.split()) <= 3 for text in short)
    assert sum(len(t.split()) for t in short) < sum(len(t.split()) for t in greedy)
