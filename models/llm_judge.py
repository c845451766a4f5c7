"""A pairwise LLM judge over any OpenAI-compatible chat-completions endpoint.

LLM judges favour whichever answer they read first, so every pair is asked in BOTH
orders (policy as A, then policy as B) and the two verdicts are combined: the
policy wins only if it is preferred in both orders or in one with a tie in the
other; a split decision is a tie. A reply that names no verdict is counted as
"unparseable" and left out of the win rate, never guessed. The API key is read
from the environment variable the config names, at call time only: the judge
object never holds it, and every message that may quote the endpoint passes
through `redact` (an endpoint that echoes its request headers would echo the key).
Plain http to another machine is refused unless the config allows it: the key
and the answers would cross the network unencrypted.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from dpoflow.errors import ConfigError, ServerError
from dpoflow.models.judge_protocol import Verdict

SYSTEM_PROMPT = (
    "You are an impartial judge comparing two answers to the same prompt. The answers may "
    "be continuations of the prompt. Judge which answer better fulfils the prompt: helpful, "
    "correct, fluent and on topic. Ignore the order in which they are shown and their length."
)
USER_TEMPLATE = """[Prompt]
{prompt}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain briefly, then end with exactly one line: "Verdict: A", "Verdict: B" or "Verdict: tie"."""

_VERDICT = re.compile(r"verdict\s*:\s*\**\s*(a|b|tie)\b", re.IGNORECASE)
# Worth another try: the server is overloaded, restarting, or slow.
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
# How much of an error reply a message quotes: enough to see why, not a page.
_QUOTED = 200


def redact(text: str, secret: str | None) -> str:
    """`text` with `secret` replaced by ***: the one gate for every message and log line that
    may quote what the endpoint sent back."""
    return text.replace(secret, "***") if secret else text


def is_loopback(url: str) -> bool:
    """True when `url` names this machine (localhost, 127.0.0.0/8, ::1)."""
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_insecure_http(base_url: str, allow_insecure_http: bool) -> None:
    """Plain http carries the key and the answers readable by anyone on the path: only to this
    machine, or when the user says the network is trusted."""
    url = httpx.URL(base_url)
    if url.scheme == "http" and not allow_insecure_http and not is_loopback(base_url):
        raise ConfigError(
            f"eval.llm.base_url sends the judge's requests and API key over plain http to "
            f"{url.host}: use an https URL, or set eval.llm.allow_insecure_http to true if "
            "that network is trusted."
        )


def parse_verdict(reply: str) -> str | None:
    """ "A", "B" or "tie" from the reply's last `Verdict:` line; None when there is none."""
    found = _VERDICT.findall(reply or "")
    if not found:
        return None
    last = found[-1].lower()
    return last if last == "tie" else last.upper()


def combine(first: str | None, second: str | None) -> Verdict:
    """Verdict for the answer shown as A in `first` and as B in `second`.

    Each order gives +1 (preferred), 0 (tie) or -1; the sum decides, so a judge that
    always picks position A ends up with a tie instead of a spurious win.
    """
    if first is None or second is None:
        return "unparseable"
    points = {"A": 1, "tie": 0, "B": -1}
    total = points[first] - points[second]
    return "win" if total > 0 else "loss" if total < 0 else "tie"


class LLMJudge:
    """Ask a chat model which of two answers is better, in both orders, with retries."""

    name = "llm"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout_seconds: float = 60.0,
        max_retries: int = 3,
        backoff_seconds: float = 1.0,
        concurrency: int = 4,
        max_tokens: int = 512,
        allow_insecure_http: bool = False,
    ):
        refuse_insecure_http(base_url, allow_insecure_http)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_seconds = timeout_seconds
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.api_key_env = api_key_env  # the variable's name; its value is never stored
        self._api_key()  # a missing key fails now, not after the policy has been sampled

    def _api_key(self) -> str | None:
        """The key, read from the environment at each call so the judge never holds it."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"eval.llm.api_key_env names {self.api_key_env}, which is not set: export "
                f"{self.api_key_env} with the endpoint's API key, or unset api_key_env."
            )
        return key

    def compare(
        self, prompts: list[str], answers_a: list[str], answers_b: list[str]
    ) -> list[Verdict]:
        if not len(prompts) == len(answers_a) == len(answers_b):
            raise ValueError("prompts, answers_a and answers_b must have the same length")
        # Every pair in both orders: (a first) then (b first).
        jobs = [(p, a, b) for p, a, b in zip(prompts, answers_a, answers_b, strict=True)]
        jobs += [(p, b, a) for p, a, b in zip(prompts, answers_a, answers_b, strict=True)]
        key = self._api_key()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with httpx.Client(timeout=self.timeout_seconds, headers=headers) as http:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                replies = list(pool.map(lambda job: self._ask(http, key, *job), jobs))
        n = len(prompts)
        return [combine(parse_verdict(replies[i]), parse_verdict(replies[n + i])) for i in range(n)]

    def _ask(
        self, http: httpx.Client, key: str | None, prompt: str, answer_a: str, answer_b: str
    ) -> str:
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": USER_TEMPLATE.format(
                        prompt=prompt, answer_a=answer_a, answer_b=answer_b
                    ),
                },
            ],
        }
        data = self._post_with_retries(http, body, key)
        try:
            return str(data["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            return ""  # not a chat completion: counted as unparseable

    def _post_with_retries(self, http: httpx.Client, body: dict, key: str | None) -> dict:
        """POST with exponential backoff on timeouts, dropped connections and 5xx/429.
        Every message passes through `redact` with the key."""
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                response = http.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"no reply within {self.timeout_seconds:g} s"
                continue
            except httpx.TransportError as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
                continue
            if response.status_code in _RETRY_STATUS:
                problem = f"HTTP {response.status_code} {quoted(response, key)}"
                continue
            if response.status_code >= 400:
                raise ServerError(
                    redact(
                        f"LLM judge endpoint {self.url} refused the request with HTTP "
                        f"{response.status_code} ({quoted(response, key)}): check eval.llm.model "
                        "and the API key in the variable eval.llm.api_key_env names.",
                        key,
                    )
                )
            try:
                return response.json()
            except ValueError:
                return {}
        raise ServerError(
            redact(
                f"LLM judge endpoint {self.url} failed {self.max_retries + 1} times ({problem}): "
                "check that the server is up and eval.llm.base_url is right, or raise "
                "eval.llm.timeout_seconds / eval.llm.max_retries.",
                key,
            )
        )


def quoted(response: httpx.Response, key: str | None) -> str:
    """The start of an error reply, for the message: redacted BEFORE it is cut, so a key cut
    in half at the edge cannot slip through."""
    return repr(redact(response.text, key)[:_QUOTED])
