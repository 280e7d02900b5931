"""MiniLM's forward as an ONNX Runtime graph: the fast path of the service.

The exported graph takes padded ids and mask and returns what the heads and
the API need, already pooled: the normalised 384-d embedding and the
concatenated mean-pooled feature layers. Pooling in the graph means one
``run`` per batch and no torch on the request path.

Why ORT: on 2 cores the fused BERT graph (attention, GELU and layer norm
fused by ``onnxruntime.transformers``) needs less CPU per prompt than the
TorchScript bf16 trace, and ``int8`` (dynamic quantisation of the weights,
VNNI on this CPU) about half. The fp32 graph matches the torch fp32 forward
to ~1e-6; int8 moves features by a few percent, so it is opt-in (see the
heads' model card for its held-out tau).

The graph is exported once per (model weights, feature layers, variant,
library versions) and cached under ``run_dir()/predictor/onnx`` by the shared
pipeline (``onnx_export``); it is never committed (90 MB).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features import onnx_export

# Bump when the exported graph changes meaning (inputs, outputs, pooling).
GRAPH_VERSION = "2"


def weights_key(model_dir: Path, state: dict[str, Any], extra: str) -> str:
    """A hash of the model's files, the weights actually loaded, and the export settings."""
    import torch

    h = hashlib.sha256()
    for file in sorted(model_dir.glob("*")):
        if file.is_file():
            h.update(file.name.encode())
            h.update(file.read_bytes())
    # Fine-tuned top layers change the weights without changing the files.
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(f"{extra}|graph{GRAPH_VERSION}|{onnx_export.library_versions()}".encode())
    return h.hexdigest()[:16]


def export(model: Any, feature_layers: Sequence[int], last_layer: int, file: Path) -> None:
    """Writes the pooled-output graph of ``model`` (an eager-attention BertModel) to ``file``."""
    import torch

    layers = tuple(feature_layers)

    class _Pooled(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: Any, mask: Any) -> tuple[Any, Any]:
            out = self.inner(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            m = mask.unsqueeze(-1).to(torch.float32)
            denom = m.sum(1).clamp(min=1e-9)
            pooled = {i: (out.hidden_states[i] * m).sum(1) / denom for i in {*layers, last_layer}}
            embedding = torch.nn.functional.normalize(pooled[last_layer], p=2, dim=1)
            return embedding, torch.cat([pooled[i] for i in layers], dim=1)

    ids = torch.tensor([[101, 2023, 2003, 102], [101, 102, 0, 0]], dtype=torch.long)
    mask = (ids != 0).to(torch.long)
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Pooled(model).eval(),
            (ids, mask),
            str(file),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding", "features"],
            dynamic_axes={
                "input_ids": axes,
                "attention_mask": axes,
                "embedding": {0: "batch"},
                "features": {0: "batch"},
            },
            opset_version=17,
        )


def optimise(src: Path, dst: Path, *, num_heads: int, hidden: int, variant: str) -> None:
    """Fuses the BERT blocks; for ``int8`` then quantises the weights dynamically."""
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden, opt_level=1
    )
    if variant == "fp32":
        fused.save_model_to_file(str(dst))
        return
    staged = dst.with_suffix(".fused.onnx")
    fused.save_model_to_file(str(staged))
    try:
        onnx_export.quantise_int8(staged, dst)
    finally:
        staged.unlink(missing_ok=True)


class OnnxEncoderSession:
    """One ORT session over the cached graph; ``run`` is called by one thread at a time."""

    def __init__(self, file: Path, threads: int) -> None:
        self.file = file
        self.session = onnx_export.cpu_session(file, threads)

    def run(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embedding, features = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return embedding, features


def build(
    model: Any,
    model_dir: Path,
    feature_layers: Sequence[int],
    variant: str,
    threads: int,
) -> OnnxEncoderSession:
    """The session for ``model``'s current weights, exporting the graph if not cached."""
    onnx_export.check_variant(variant)
    from transformers import AutoModel

    config = model.config
    last = int(config.num_hidden_layers)
    layers = tuple(int(x) for x in feature_layers)
    state = model.state_dict()
    key = weights_key(model_dir, state, f"L{''.join(map(str, layers))}|{variant}")
    file = onnx_export.graph_file("minilm", key, variant)

    def write(dst: Path) -> None:
        # The fusion recognises the eager attention pattern, not SDPA's.
        eager = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
        eager.load_state_dict(state)
        eager.eval()
        with onnx_export.scratch(file, "raw") as raw:
            export(eager, layers, last, raw)
            optimise(
                raw,
                dst,
                num_heads=int(config.num_attention_heads),
                hidden=int(config.hidden_size),
                variant=variant,
            )

    onnx_export.export_once(file, write)
    return OnnxEncoderSession(file, threads)
