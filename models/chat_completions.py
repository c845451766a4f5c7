"""OpenAI chat completions in and out of the registered text generator's request shape.

A `/v1/chat/completions` body becomes one `messages` row of the generator's request (the
model renders it with its chat template); the generator's answer row becomes a
`chat.completion` object with its `usage`. Only what the generator can honour is accepted:
one choice, no streaming, text content.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pandas as pd

# OpenAI's default when a request names no temperature.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 64
# A bound on one answer, so one request cannot hold the model (and a version swap) for long.
MAX_TOKENS = 4096


class ChatRequestError(ValueError):
    """A request the generator cannot answer; the message says what to send instead."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _text(content: Any, index: int) -> str:
    """A message's content: a string, or the text of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" for part in content
    ):
        return "".join(str(part.get("text", "")) for part in content)
    raise ChatRequestError(
        f"messages[{index}].content must be text (a string or text parts): this model reads "
        "text only, so send the message as a string.",
        param=f"messages[{index}].content",
    )


def request_frame(body: dict[str, Any]) -> pd.DataFrame:
    """The generator's request for a chat-completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError(
            "'messages' must be a non-empty list of {role, content} objects: send the chat "
            'so far, e.g. [{"role": "user", "content": "Hello"}].',
            param="messages",
        )
    chat = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ChatRequestError(
                f"messages[{index}] has no 'role': send {{role, content}} objects.",
                param=f"messages[{index}]",
            )
        chat.append({"role": str(message["role"]), "content": _text(message.get("content"), index)})
    if body.get("stream"):
        raise ChatRequestError(
            "streaming is not supported by this server: send the request without stream=true.",
            param="stream",
        )
    if body.get("n", 1) != 1:
        raise ChatRequestError(
            "only one choice per request is supported: send n=1 (or leave n out).", param="n"
        )
    # max_completion_tokens is the current name; max_tokens the older one, still sent.
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ChatRequestError(
            f"max_completion_tokens must be a whole number, got {max_tokens!r}: send an integer.",
            param="max_completion_tokens",
        )
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise ChatRequestError(
            f"max_completion_tokens must be between 1 and {MAX_TOKENS}, got {max_tokens}: "
            "send a value in that range.",
            param="max_completion_tokens",
        )
    temperature = body.get("temperature")
    return pd.DataFrame(
        {
            "messages": pd.Series([chat], dtype=object),
            "max_new_tokens": [int(max_tokens)],
            "temperature": [float(DEFAULT_TEMPERATURE if temperature is None else temperature)],
        }
    )


def completion(answer: pd.DataFrame, model: str) -> dict[str, Any]:
    """The `chat.completion` object for the generator's one-row answer."""
    row = answer.iloc[0]
    prompt_tokens, completion_tokens = int(row["prompt_tokens"]), int(row["completion_tokens"])
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": str(row["text"])},
                "finish_reason": str(row["finish_reason"]),
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, which its clients raise as BadRequestError with this message."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": param}}
