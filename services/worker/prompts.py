"""Prompt formats and the per-model settings of a worker.

The worker, not the model server, formats the prompt or a chat request's
messages with the model's chat template: a vLLM backend takes ``text_input`` as
the exact text to continue, so the same worker drives a GPU Triton unchanged,
and the scheduler and the gateway need no template. Resume by recompute appends
the text already generated after the formatted prompt, so that the model
continues its own answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shortline.common.limits import ModelLimits

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Each chat format: what opens the text, each turn ({role}, {content}), the opening of
# the assistant's turn that the model continues, and the system turn it adds when the
# conversation has none (SmolLM2's template does; the others add nothing).
_Format = tuple[str, str, str, str]
_FORMATS: dict[str, _Format] = {
    # SmolLM2's chat template (its GGUF's tokenizer.chat_template), default system prompt too.
    "smollm2": (
        "",
        "<|im_start|>{role}\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
        SMOLLM2_SYSTEM,
    ),
    "chatml": ("", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", ""),
    "llama3": (
        "<|begin_of_text|>",
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "",
    ),
}
RAW = "raw"
FORMATS = (*_FORMATS, RAW)
ROLES = ("system", "user", "assistant")


class ChatRefused(ValueError):
    """A conversation this model cannot take (INVALID_ARGUMENT's message)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    prompt_format: str
    max_tokens: int


def model_limits(models: Mapping[str, ModelSpec], max_prompt_chars: int) -> tuple[ModelLimits, ...]:
    """What the worker advertises at registration, per served model: its max_tokens,
    the worker's prompt limit and the shared sampling ranges."""
    return tuple(
        ModelLimits(spec.name, max_tokens=spec.max_tokens, max_prompt_chars=max_prompt_chars)
        for spec in sorted(models.values(), key=lambda spec: spec.name)
    )


def chat_models(models: Mapping[str, ModelSpec]) -> frozenset[str]:
    """The served models whose format has a chat template: the worker advertises them
    (``ModelLimits.chat``), so the scheduler sends it messages only for these."""
    return frozenset(spec.name for spec in models.values() if spec.prompt_format != RAW)


def format_prompt(prompt_format: str, prompt: str, resume_text: str = "") -> str:
    """A single prompt as the model expects it: one user turn in its chat format (the
    raw format: the prompt itself), then the text already generated."""
    if prompt_format == RAW:
        return prompt + resume_text
    return format_messages(prompt_format, [("user", prompt)], resume_text)


def format_messages(
    prompt_format: str, messages: Sequence[tuple[str, str]], resume_text: str = "", model: str = ""
) -> str:
    """A conversation ``(role, content)`` in the model's chat template, opening the
    assistant's turn, then the text already generated. Content is put in verbatim, as
    the templates do (no trimming, no escaping of the template's own markers: the
    scheduler's tenants are trusted with their own conversation's roles).

    Raises ChatRefused for the raw format (no template to apply), an unknown role, or
    no messages."""
    if prompt_format == RAW or prompt_format not in _FORMATS:
        raise ChatRefused(
            f"model {model!r} is served with the {prompt_format} prompt format, which has "
            "no chat template: send a prompt, not messages"
        )
    if not messages:
        raise ChatRefused("messages must not be empty")
    begin, turn, assistant, default_system = _FORMATS[prompt_format]
    parts = [begin]
    if default_system and messages[0][0] != "system":
        parts.append(turn.replace("{role}", "system").replace("{content}", default_system))
    for role, content in messages:
        if role not in ROLES:
            shown = repr(role[:32])
            raise ChatRefused(f"messages role must be one of {', '.join(ROLES)}, got {shown}")
        # One pass per field: a content holding "{role}" stays as it is.
        head, _, tail = turn.partition("{content}")
        parts.append(head.replace("{role}", role) + content + tail)
    parts.append(assistant)
    return "".join(parts) + resume_text


def parse_models(spec: str) -> dict[str, ModelSpec]:
    """Parses ``NAME=FORMAT:MAX_TOKENS,...`` (``FORMAT`` and ``MAX_TOKENS`` optional)."""
    models: dict[str, ModelSpec] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, rest = item.partition("=")
        fmt, _, limit = rest.partition(":")
        fmt = fmt or "raw"
        if fmt not in FORMATS:
            raise ValueError(f"model {name}: prompt format must be one of {FORMATS}, got {fmt!r}")
        try:
            max_tokens = int(limit) if limit else 4096
        except ValueError as exc:
            raise ValueError(f"model {name}: max tokens must be an integer, got {limit!r}") from exc
        if max_tokens < 1:
            raise ValueError(f"model {name}: max tokens must be positive, got {max_tokens}")
        models[name.strip()] = ModelSpec(name.strip(), fmt, max_tokens)
    if not models:
        raise ValueError("no models configured")
    return models
