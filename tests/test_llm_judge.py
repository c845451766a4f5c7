"""The pairwise LLM judge against a real chat-completions server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flows.errors import ConfigError, ServerError
from models.evaluation import win_rate_from_verdicts
from models.judges import PairwiseJudge, make_judge
from models.llm_judge import LLMJudge, combine, parse_verdict

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


def test_the_api_key_comes_from_the_named_variable_only(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "sk-secret")
    with ChatServer() as server:
        judge = judge_for(server, api_key_env="JUDGE_KEY_FOR_TEST")
        judge.compare(["p"], ["good"], ["bad"])
    assert server.auth == ["Bearer sk-secret"] * 2
    assert "sk-secret" not in repr(vars(judge).get("model")) + judge.url
    monkeypatch.delenv("JUDGE_KEY_FOR_TEST")
    with pytest.raises(ConfigError, match="JUDGE_KEY_FOR_TEST"):
        judge_for(server, api_key_env="JUDGE_KEY_FOR_TEST")


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
