"""Prompt formats and the per-model settings of a worker.

The worker, not the model server, formats the prompt: a vLLM backend takes
``text_input`` as the exact text to continue, so the same worker drives a GPU
Triton unchanged. Resume by recompute appends the text already generated
after the formatted prompt, so that the model continues its own answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shortline.common.limits import ModelLimits

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_TEMPLATES: dict[str, str] = {
    # SmolLM2's chat template with the system prompt it adds by default.
    "smollm2": (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "chatml": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "raw": "{prompt}",
}

FORMATS = tuple(_TEMPLATES)


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


def format_prompt(prompt_format: str, prompt: str, resume_text: str = "") -> str:
    template = _TEMPLATES[prompt_format]
    return template.replace("{prompt}", prompt) + resume_text


def parse_models(spec: str) -> dict[str, ModelSpec]:
    """Parses ``NAME=FORMAT:MAX_TOKENS,...`` (``FORMAT`` and ``MAX_TOKENS`` optional)."""
    models: dict[str, ModelSpec] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, rest = item.partition("=")
        fmt, _, limit = rest.partition(":")
        fmt = fmt or "raw"
        if fmt not in _TEMPLATES:
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
