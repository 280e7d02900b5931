"""``POST /v1/chat/completions``: a conversation through the scheduler's ``Generate``.

The messages go to the scheduler as messages (``GenerateRequest.messages``); the
worker formats them with the model's own chat template, so the gateway needs
no tokenizer and knows no template. Everything else (parameters, statuses,
streaming, disconnects, headers) is the completions path's; only the shapes
differ: ``chat.completion`` with an assistant ``message``, and a stream of
``chat.completion.chunk`` whose first delta carries the role, then the text's
content deltas, then an empty delta with the finish reason, as OpenAI sends it.
"""

from __future__ import annotations

from typing import Any

from services.gateway.completions import Completion


class ChatCompletion(Completion):
    PREFIX = "chatcmpl-"
    OBJECT = "chat.completion"
    CHUNK_OBJECT = "chat.completion.chunk"

    def _choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def _delta(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        # The last chunk's delta is empty: it only says why the answer ended.
        delta = {"content": text} if finish_reason is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def _opening(self) -> list[dict[str, Any]]:
        """The role first, with empty content (OpenAI's first chunk)."""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        body = self._body([choice], None, chunk=True)
        if self.params.include_usage:
            body["usage"] = None
        return [body]
