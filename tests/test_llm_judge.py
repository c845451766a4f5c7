"""The pairwise LLM judge against a real chat-completions server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dpoflow.config import load_config
from dpoflow.errors import ConfigError, ServerError
from dpoflow.models.evaluation import win_rate_from_verdicts
from dpoflow.models.judge_protocol import PairwiseJudge
from dpoflow.models.judges import make_judge
from dpoflow.models.llm_judge import LLMJudge, combine, parse_verdict

ANSWER = re.compile(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\n", re.DOTALL)


class ChatServer:
    """A chat-completions endpoint whose behaviour a test scripts.

    It prefers the answer containing "good", says "no idea" (no verdict) when an answer
    contains "???", and can sleep past the client's timeout or answer 500 a set
    number of times first. It records every (answer A, answer B) it was asked about.
    """

    def __init__(self, *, sleep_first: float = 0.0, fail_first: int = 0, always_500=False):
        self.asked: list[tuple[str, str]] = []
        self.requests = 0
        self.auth: list[str | None] = []
        self.sleep_first, self.fail_first, self.always_500 = sleep_first, fail_first, always_500
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests += 1
                    number = server.requests
                    server.auth.append(self.headers.get("Authorization"))
                if number == 1 and server.sleep_first:
                    time.sleep(server.sleep_first)
                if server.always_500 or number <= server.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                a, b = ANSWER.search(body["messages"][-1]["content"]).groups()
                with server._lock:
                    server.asked.append((a, b))
                if "???" in a + b:
                    reply = "no idea"
                elif "good" in a and "good" not in b:
                    reply = "A is better.\nVerdict: A"
                elif "good" in b and "good" not in a:
                    reply = "B is better.\nVerdict: B"
                else:
                    reply = "Verdict: tie"
                payload = {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # the client gave up on a slow reply: expected in the timeout test

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def judge_for(server: ChatServer, **options) -> LLMJudge:
    settings = {"timeout_seconds": 2.0, "max_retries": 2, "backoff_seconds": 0.01}
    return LLMJudge(base_url=server.base_url, model="judge", **(settings | options))


def test_both_orders_are_asked_and_unparseable_replies_are_counted():
    prompts = ["p1", "p2", "p3", "p4"]
    policy = ["good one", "meh", "same", "???"]
    reference = ["meh", "good two", "same", "fine"]
    with ChatServer() as server:
        verdicts = judge_for(server).compare(prompts, policy, reference)
    assert sorted(server.asked) == sorted(
        [(p, r) for p, r in zip(policy, reference, strict=True)]
        + [(r, p) for p, r in zip(policy, reference, strict=True)]
    )
    assert verdicts == ["win", "loss", "tie", "unparseable"]
    result = win_rate_from_verdicts(verdicts)
    assert (result.n, result.unparseable, result.rate) == (3, 1, 0.5)


def test_a_timeout_is_retried():
    with ChatServer(sleep_first=3.0) as server:
        verdicts = judge_for(server, timeout_seconds=0.5, concurrency=1).compare(
            ["p"], ["good"], ["bad"]
        )
    assert verdicts == ["win"]
    assert server.requests == 3  # the one that timed out, its retry, the other order


def test_a_500_is_retried_then_a_clear_error_names_the_endpoint():
    with ChatServer(fail_first=1) as server:
        assert judge_for(server, concurrency=1).compare(["p"], ["good"], ["bad"]) == ["win"]
    with ChatServer(always_500=True) as server:
        with pytest.raises(ServerError) as caught:
            judge_for(server, concurrency=1).compare(["p"], ["good"], ["bad"])
        assert server.requests >= 3  # 1 try + 2 retries at least
    message = str(caught.value)
    assert server.base_url + "/chat/completions" in message and "HTTP 500" in message


SECRET = "sk-dpoflowFAKEjudge0123456789"


class EchoServer:
    """An endpoint that refuses every request with `status` and echoes the Authorization
    header it got in the body, as a misconfigured proxy or a debug endpoint does."""

    def __init__(self, status: int):
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                auth = self.headers.get("Authorization")
                server.auth.append(auth)
                data = f"rejected: Authorization: {auth}".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> EchoServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def held_text(value: Any, depth: int = 0) -> str:
    """Everything `value` holds, as text: simple containers and objects' attributes
    (vars()) are walked, recursively."""
    if depth > 6:
        return ""
    if isinstance(value, dict):
        return " ".join(held_text(k, depth + 1) + held_text(v, depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return " ".join(held_text(item, depth + 1) for item in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return repr(value) + held_text(vars(value), depth + 1)
    return repr(value)


def test_the_api_key_comes_from_the_named_variable_only(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", SECRET)
    with ChatServer() as server:
        judge = judge_for(server, api_key_env="JUDGE_KEY_FOR_TEST")
        judge.compare(["p"], ["good"], ["bad"])
    assert server.auth == [f"Bearer {SECRET}"] * 2
    assert SECRET not in held_text(judge)  # every attribute, at any depth
    monkeypatch.delenv("JUDGE_KEY_FOR_TEST")
    with pytest.raises(ConfigError, match="JUDGE_KEY_FOR_TEST"):
        judge_for(server, api_key_env="JUDGE_KEY_FOR_TEST")


@pytest.mark.parametrize("status", [500, 401])  # retried, then refused at once
def test_an_endpoint_echoing_the_key_never_leaks_it(monkeypatch, caplog, status):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", SECRET)
    with caplog.at_level(logging.DEBUG), EchoServer(status) as server:
        judge = LLMJudge(
            base_url=server.base_url,
            model="judge",
            api_key_env="JUDGE_KEY_FOR_TEST",
            max_retries=1,
            backoff_seconds=0.01,
            timeout_seconds=2.0,
            concurrency=1,
        )
        with pytest.raises(ServerError) as caught:
            judge.compare(["p"], ["good"], ["bad"])
    assert set(server.auth) == {f"Bearer {SECRET}"}  # the key went out and came back
    error = "".join(traceback.format_exception(caught.value))
    assert f"HTTP {status}" in error and "Authorization: Bearer ***" in error  # quoted, redacted
    assert SECRET not in error
    assert any(r.name.startswith(("httpx", "httpcore")) for r in caplog.records)  # logs were seen
    assert SECRET not in caplog.text + " ".join(repr(r.args) for r in caplog.records)
    assert SECRET not in held_text(judge)


@pytest.mark.parametrize("url", ["http://judge.example.com/v1", "http://10.0.0.7:8000/v1"])
def test_plain_http_to_another_machine_is_refused_unless_allowed(url):
    with pytest.raises(ConfigError) as caught:
        LLMJudge(base_url=url, model="judge")
    message = str(caught.value)
    assert "eval.llm.base_url" in message and "eval.llm.allow_insecure_http" in message
    assert "https" in message and message.endswith(".") and "\n" not in message
    assert LLMJudge(base_url=url, model="judge", allow_insecure_http=True).url.startswith(url)

    overrides = ["eval.judge=llm", f"eval.llm.base_url={url}", "eval.llm.model=judge"]
    cfg = load_config(overrides=overrides)
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        make_judge("llm", cfg.eval.model_dump(mode="json"))
    allowed = load_config(overrides=[*overrides, "eval.llm.allow_insecure_http=true"])
    assert make_judge("llm", allowed.eval.model_dump(mode="json")).url.startswith(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://judge.example.com/v1",
        "http://127.0.0.1:8000/v1",
        "http://127.8.9.1/v1",
        "http://localhost:8000/v1",
        "http://[::1]:8000/v1",
    ],
)
def test_https_and_loopback_need_no_flag(url):
    assert LLMJudge(base_url=url, model="judge").url.startswith(url)


def test_make_judge_builds_the_llm_judge_from_the_eval_section():
    section = {"llm": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0}}
    judge = make_judge("llm", section)
    assert isinstance(judge, PairwiseJudge) and judge.name == "llm"
    with pytest.raises(ConfigError, match="base_url"):
        make_judge("llm", {"llm": {}})


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("Verdict: A", "A"), ("so... verdict: **B**", "B"), ("Verdict: TIE.", "tie"), ("A", None)],
)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


def test_combine_cancels_position_bias():
    assert combine("A", "A") == "tie"  # always picks the first position: no preference
    assert combine("A", "B") == "win"
    assert combine("tie", "B") == "win"
    assert combine("B", "A") == "loss"
    assert combine(None, "B") == "unparseable"
