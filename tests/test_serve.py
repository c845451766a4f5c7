"""`dpoflow serve` as real processes: it follows `champion` through a promotion and a
rollback under a client that never pauses, keeps the old version when a new one fails to
load, and answers the official `openai` client on /v1/chat/completions.

The registry is a real MLflow SQLite store with three versions logged by the project's
registration path (`log_generator`): two tiny policies that differ in their weights, and one
whose weights folder is broken."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import mlflow
import pytest

from dpoflow.data_checks.loading import _chat_renderer
from dpoflow.models.generation import generate, load_causal_lm
from dpoflow.models.serving import log_generator
from tests.conftest import base_env, run_cli, worker_fixture
from tests.servers import background, free_port
from tests.test_evaluation import save_tiny_model

pytestmark = pytest.mark.slow

NAME = "served-policy"
PROMPT = "this movie was"
CHAT = [{"role": "user", "content": "what a wonderful story"}]
TOKENS = 6


def greedy(model_dir: Path, prompt: str, max_new_tokens: int = TOKENS) -> str:
    model, tokenizer = load_causal_lm(str(model_dir))
    return generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=0.0)[0]


@worker_fixture
def served(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """Versions 1 and 2 (other weights) and 3 (broken) of NAME; champion v1; `dpoflow serve`
    polling the alias every second."""
    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp}/mlflow.db"
    dirs = {"1": save_tiny_model(tmp / "v1", seed=0), "2": save_tiny_model(tmp / "v2", seed=1)}
    broken = save_tiny_model(tmp / "v3", seed=2)
    (broken / "config.json").write_text("{not json")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("serve", artifact_location=(tmp / "a").as_uri())
            for folder in (dirs["1"], dirs["2"], broken):
                with mlflow.start_run(experiment_id=experiment):
                    info = log_generator(str(folder), chat_template="auto")
                mlflow.register_model(info.model_uri, NAME)
            mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "1")
        finally:
            mlflow.set_tracking_uri(None)
    home = tmp / "prefect-home"
    home.mkdir()
    env = base_env(home) | {"MLFLOW_TRACKING_URI": uri}
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("dpoflow")), "serve"]
    cmd += ["--model", NAME, "--port", str(port), "--poll-seconds", "1"]
    log = tmp / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with background(cmd, log, env, tmp, f"{url}/health"):
        yield SimpleNamespace(url=url, env=env, log=log, dirs=dirs, tmp=tmp)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def promote(served, *args: str) -> float:
    """`dpoflow promote NAME ARGS` as a user runs it; returns how long the command took."""
    started = time.monotonic()
    proc = run_cli(["promote", NAME, *args, "--workdir", str(served.tmp)], served.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    took = time.monotonic() - started
    print(f"\n$ dpoflow promote {NAME} {' '.join(args)}  ({took:.1f}s)\n{proc.stdout.strip()}")
    return took


def wait_for_version(url: str, version: str, timeout: float = 30) -> float:
    """Seconds until /health names `version`; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if health(url)["version"] == version:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"/health did not name v{version} within {timeout}s: {health(url)}")


@dataclass
class Client:
    """Sends /invocations without pause from a thread; records every answer."""

    url: str
    answers: list[tuple[str, str]] = field(default_factory=list)  # (version, text)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        request = {"dataframe_records": [{"prompt": PROMPT, "max_new_tokens": TOKENS}]}
        request["dataframe_records"][0]["temperature"] = 0.0
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                try:
                    reply = http.post(f"{self.url}/invocations", json=request)
                    if reply.status_code != 200:
                        self.failures.append(f"{reply.status_code} {reply.text[:200]}")
                        continue
                    text = reply.json()["predictions"][0]["text"]
                    self.answers.append((reply.headers["X-Model-Version"], text))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))


def test_the_openai_client_gets_a_chat_completion(served):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{served.url}/v1", api_key="not-checked", max_retries=0)
    reply = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=TOKENS, temperature=0
    )
    version = health(served.url)["version"]
    rendered, _ = _chat_renderer(None)(CHAT)  # the tiny tokenizer has no chat template
    print(f"\nchat completion from v{version}: {reply.model_dump_json()}")
    assert reply.model == f"{NAME}/{version}"
    assert reply.choices[0].message.content == greedy(served.dirs[version], rendered)
    usage = reply.usage
    assert usage.prompt_tokens > len(rendered.split()) and 1 <= usage.completion_tokens <= TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reply.choices[0].finish_reason in {"stop", "length"}
    with pytest.raises(BadRequestError, match="streaming is not supported"):
        client.chat.completions.create(model=NAME, messages=CHAT, stream=True)


def test_the_server_follows_a_promotion_and_a_rollback_without_a_failed_request(served):
    expected = {v: greedy(folder, PROMPT) for v, folder in served.dirs.items()}
    assert expected["1"] != expected["2"], "the two versions must answer differently"
    assert health(served.url)["version"] == "1"
    client = Client(served.url)
    thread = threading.Thread(target=client.run)
    thread.start()
    try:
        time.sleep(2)
        # Measured from the end of the command: the alias moves while it runs, so this is
        # at most the swap's delay; the server's log has the delay from alias seen to swap.
        promote(served, "2", "--force")
        swap = wait_for_version(served.url, "2")
        time.sleep(1)
        promote(served, "--rollback")
        back = wait_for_version(served.url, "1")
        time.sleep(1)
    finally:
        client.stop.set()
        thread.join(timeout=60)
    versions = [version for version, _ in client.answers]
    print(
        f"\nrequests {len(client.answers) + len(client.failures)}, failures "
        f"{len(client.failures)}, swap to v2 {swap:.1f}s after the promotion, back to v1 "
        f"{back:.1f}s after the rollback; answers by version "
        f"{ {v: versions.count(v) for v in sorted(set(versions))} }"
    )
    assert client.failures == []
    assert swap < 30 and back < 30
    # Each answer is its version's own: v1, then v2, then v1 again.
    assert all(text == expected[version] for version, text in client.answers)
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes == ["1", "2", "1"]
    log = served.log.read_text()
    swaps = [line for line in log.splitlines() if "now serving" in line]
    print(*swaps, sep="\n")
    assert "now serving served-policy v2" in swaps[0] and "now serving served-policy v1" in swaps[1]


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(served):
    assert health(served.url)["version"] == "1"
    promote(served, "3", "--force")
    deadline = time.monotonic() + 60
    while "could not load" not in served.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    line = next(x for x in served.log.read_text().splitlines() if "could not load" in x)
    print(f"\n{line}")
    assert f"could not load {NAME} v3" in line and "still serving v1" in line
    assert health(served.url)["version"] == "1"
    request = {"dataframe_records": [{"prompt": PROMPT, "max_new_tokens": 2}]}
    reply = httpx.post(f"{served.url}/invocations", json=request, timeout=30)
    assert reply.status_code == 200 and reply.headers["X-Model-Version"] == "1"
    assert json.loads(reply.text)["predictions"][0]["text"] is not None
