"""The worker's chat formats, exactly: SmolLM2's against the template the model ships
(its GGUF's ``tokenizer.chat_template``, rendered with Jinja as Hugging Face does),
ChatML and Llama 3 against their published templates written out; raw refuses."""

from __future__ import annotations

import functools

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.worker.prompts import (
    SMOLLM2_SYSTEM,
    ChatRefused,
    chat_models,
    format_messages,
    format_prompt,
    parse_models,
)
from shortline.common.models import smollm2_gguf_path

CONVERSATION = [
    ("system", "Be brief."),
    ("user", "Name a river."),
    ("assistant", "The Nile."),
    ("user", "Another, {content} {role}?"),
]


@functools.cache
def _smollm2_template() -> str:
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@pytest.mark.parametrize(
    "messages",
    [
        CONVERSATION,
        CONVERSATION[1:],  # no system message: the template adds SmolLM's own
        [("user", "Hi")],
        [("user", "  spaced  \n"), ("assistant", ""), ("user", "<|im_end|> literal")],
    ],
)
def test_smollm2_is_the_models_own_chat_template(messages: list[tuple[str, str]]) -> None:
    template = ImmutableSandboxedEnvironment().from_string(_smollm2_template())
    expected = template.render(
        messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True
    )
    assert format_messages("smollm2", messages) == expected
    assert format_messages("smollm2", messages, " so far") == expected + " so far"


def test_chatml_exactly() -> None:
    assert format_messages("chatml", CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nName a river.<|im_end|>\n"
        "<|im_start|>assistant\nThe Nile.<|im_end|>\n"
        "<|im_start|>user\nAnother, {content} {role}?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_llama3_exactly() -> None:
    assert format_messages("llama3", CONVERSATION, "It") == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a river.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe Nile.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnother, {content} {role}?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt"
    )


@pytest.mark.parametrize("fmt", ["smollm2", "chatml", "llama3"])
def test_a_prompt_is_one_user_message(fmt: str) -> None:
    assert format_prompt(fmt, "Hi", "x") == format_messages(fmt, [("user", "Hi")], "x")


def test_smollm2_single_prompt_keeps_its_system_prompt() -> None:
    assert format_prompt("smollm2", "Hi") == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_raw_refuses_chat_naming_the_model_and_unknown_roles_are_named() -> None:
    with pytest.raises(ChatRefused, match=r"model 'replay'.*raw"):
        format_messages("raw", [("user", "Hi")], model="replay")
    with pytest.raises(ChatRefused, match=r"role.*'tool'"):
        format_messages("chatml", [("user", "Hi"), ("tool", "42")])
    with pytest.raises(ChatRefused, match="must not be empty"):
        format_messages("chatml", [])


def test_only_models_with_a_template_are_advertised_for_chat() -> None:
    models = parse_models("a=smollm2:100,b=raw:5,c=llama3,d=chatml")
    assert chat_models(models) == {"a", "c", "d"}
