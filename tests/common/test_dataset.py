"""The split never leaks an instruction across splits, and token counts are cached."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from shortline.common import dataset, paths

TARGETS = ["Meta-Llama-3-8B-Instruct", "claude-2.1"]
needs_data = pytest.mark.skipif(
    not paths.alpaca_eval_outputs(TARGETS[0]).exists(),
    reason=f"shared data absent: {paths.data_dir()} has no alpaca_eval outputs",
)


def test_split_is_deterministic_and_roughly_70_10_20() -> None:
    texts = [f"instruction number {i}" for i in range(5000)]
    first = [dataset.split_of(t) for t in texts]
    assert first == [dataset.split_of(t) for t in texts]
    counts = Counter(first)
    assert 0.66 < counts["train"] / 5000 < 0.74
    assert 0.08 < counts["val"] / 5000 < 0.12
    assert 0.17 < counts["test"] / 5000 < 0.23


@needs_data
def test_split_puts_each_instruction_in_one_split_for_every_model() -> None:
    per_model = {
        m: {e.instruction: dataset.split_of(e.instruction) for e in dataset.load_examples(m)}
        for m in TARGETS
    }
    first, second = (per_model[m] for m in TARGETS)
    assert first == second
    train = {i for i, s in first.items() if s == "train"}
    test = {i for i, s in first.items() if s == "test"}
    val = {i for i, s in first.items() if s == "val"}
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(train) + len(val) + len(test) == 805


@needs_data
def test_load_examples_counts_tokens_and_is_fast_when_cached() -> None:
    examples = dataset.load_examples(TARGETS[0])
    assert len(examples) == 805
    assert all(e.output_tokens > 0 for e in examples)
    start = time.perf_counter()
    again = dataset.load_examples(TARGETS[0])
    assert time.perf_counter() - start < 1.0
    assert again == examples
    sample = examples[0]
    assert dataset.count_tokens([sample.output]) == [sample.output_tokens]


def test_unknown_model_names_the_model() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        dataset.load_examples("no-such-model")
