"""The SmolLM2 feature forward as an ONNX Runtime int8 graph: the fast path.

``smollm2`` runs the truncated decoder in torch (bf16); this module
writes the same computation as a small plain-torch module and exports it:

- the template's constant prefix (system prompt and ``<|im_start|>user\\n``)
  is run once at export and its keys/values are constants of the graph, so a
  prompt runs only its own tokens (as the torch path's KV reuse does);
- the input is the prompt's ids after that prefix, one prompt per run (no
  padding: ORT's dynamic quantisation scales activations by the whole input,
  so a batch-mate would change a prompt's features);
- the output is the last token's hidden state after each feature layer; the
  last feature layer computes its query, attention output and MLP for the last
  token only (the other positions are only needed as keys and values);
- ``int8``: per-channel dynamic int8 weights (``quantize_dynamic``, VNNI on
  this CPU), as the MiniLM graph (``minilm_onnx``; both through the shared
  ``onnx_export`` pipeline), after SmoothQuant-style smoothing (below).

Why smoothing: dynamic quantisation gives each matmul input one int8 scale
for the whole tensor, and SmolLM2's matmul inputs have a few channels 10-80x
larger than the median (``down_proj``'s input in layers 2, 3, 10-12), so plain
int8 moved the layer-20 features by 15% (median, relative L2) and a head
retrained on them lost 0.04 of held-out tau. Each linear layer's input
channel j is divided by ``s_j = sqrt(max|x_j| / max|W_j|)`` and its weight
column multiplied by it, the division folded into the weights before it (the
RMSNorm weight for q/k/v and gate/up, ``up_proj``'s rows for ``down_proj``):
exact in real arithmetic, and it splits the range between activation and
weight. ``max|x_j|`` comes from :data:`CALIBRATION_PROMPTS` (built in, so the
graph needs no data files). Features then move 8% and a head retrained on
them comes within 0.01 of the fp32 features' tau (artifacts/heads_smollm2/README.md).

The graph is exported once per (GGUF file, layers, prefix, calibration,
variant, library versions) and cached under ``run_dir()/predictor/onnx``;
never committed (int8 ~190 MB, fp32 ~400 MB). The export runs in a fresh
interpreter (``python -m services.predictor.features.smollm2_export``, started
by name: this module imports neither it nor the extractor).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.predictor.features import onnx_export

# Bump when the exported graph changes meaning (inputs, outputs, computation).
GRAPH_VERSION = "1"
SMOOTHING_ALPHA = 0.5
# Varied user turns (questions, tasks, code, lists, long and short) whose
# activations set the smoothing scales; none is an alpaca_eval instruction.
CALIBRATION_PROMPTS = (
    "What is the capital of Australia?",
    "hi",
    "Write a haiku about autumn leaves.",
    "Explain how a refrigerator works to a ten-year-old.",
    "Give me a list of ten healthy breakfast ideas with a short description of each.",
    "Translate 'Where is the train station?' into French, German and Spanish.",
    "Write a Python function that returns the n-th Fibonacci number, with tests.",
    "def add(a, b):\n    return a - b\n\nWhat is wrong with this code?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "I have a job interview tomorrow for a data analyst position. What questions should I "
    "expect, and how should I prepare tonight? Please be detailed.",
    "Is 1001 a prime number? Answer yes or no.",
    "Compose a formal email to my landlord asking to fix a leaking kitchen tap.",
    "What are the pros and cons of nuclear energy? Give a balanced essay of about 500 words.",
    "Name three mammals that lay eggs.",
    "Rewrite this sentence to be more concise: 'Due to the fact that it was raining, we "
    "made the decision to stay inside the house for the duration of the afternoon.'",
    "Create a 7-day workout plan for a beginner who wants to build strength at home.",
    "Who won the FIFA World Cup in 1998?",
    "Write a short story about a robot who learns to paint.",
    "Convert 72 degrees Fahrenheit to Celsius and show the steps.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name; -- explain this SQL query",
    "What does the acronym NASA stand for?",
    "Describe the water cycle, including evaporation, condensation, precipitation and "
    "collection, and explain why it matters for agriculture.",
    "Suggest five names for a coffee shop run by cats.",
    "How do I reverse a linked list in C? Explain step by step and give the code.",
    "Classify the sentiment of this review as positive, negative or neutral: 'The food "
    "was cold and the waiter ignored us.'",
    "What's 17 times 23?",
    "Write a limerick about a programmer who never sleeps.",
    "Outline a research plan to study the effects of social media on teenage sleep.",
    "Tell me a joke.",
    "Compare and contrast the French and American revolutions in a detailed table.",
    "List the planets of the solar system in order from the sun.",
    "Please proofread: 'Their going to the park tomorow, weather or not it rains.'",
)
# Set in the child process that exports (see _export_in_child).
IN_EXPORTER = "SHORTLINE_SMOLLM2_EXPORTER"
EXPORTER_MODULE = "services.predictor.features.smollm2_export"


def suffix_module(model: Any, layers: Sequence[int], prefix: Sequence[int]) -> Any:
    """A torch module: ids after ``prefix`` -> the last token's states after ``layers``.

    ``model`` is the (possibly truncated) ``LlamaModel`` of SmolLM2 in fp32;
    its weights are shared, not copied.
    """
    import torch

    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(config.num_key_value_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    theta = float(config.rope_parameters["rope_theta"])
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {config.rope_parameters['rope_type']!r} is not supported")
    want = tuple(int(x) for x in layers)
    depth = max(want)
    n_layers = int(config.num_hidden_layers)

    class _Suffix(torch.nn.Module):
        cos: Any
        sin: Any

        def __init__(self) -> None:
            super().__init__()
            self.embed = model.embed_tokens
            self.blocks = torch.nn.ModuleList(list(model.layers[:depth]))
            self.norm = model.norm
            inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            pos = torch.arange(int(config.max_position_embeddings), dtype=torch.float32)
            freqs = torch.outer(pos, inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)
            self.p = 0
            self.prefix_k: list[Any] = []
            self.prefix_v: list[Any] = []

        def _rope(self, x: Any, start: int, n: Any) -> Any:
            cos = self.cos[start : start + n]
            sin = self.sin[start : start + n]
            half = x.shape[-1] // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
            return x * cos + rotated * sin

        def forward(self, ids: Any) -> Any:
            n = ids.shape[1]
            x = self.embed(ids)[0]  # (n, hidden)
            p = self.p
            rows = torch.arange(n) + p
            cols = torch.arange(n + p)
            mask = torch.where(cols[None, :] > rows[:, None], float("-inf"), 0.0)
            out = []
            keys, values = [], []
            blocks: list[Any] = list(self.blocks)
            for i, block in enumerate(blocks, start=1):
                attn = block.self_attn
                h = block.input_layernorm(x)
                k = attn.k_proj(h).view(n, kv_heads, head_dim).transpose(0, 1)
                v = attn.v_proj(h).view(n, kv_heads, head_dim).transpose(0, 1)
                k = self._rope(k, p, n)
                keys.append(k)
                values.append(v)
                if p:
                    k = torch.cat([self.prefix_k[i - 1], k], dim=1)
                    v = torch.cat([self.prefix_v[i - 1], v], dim=1)
                last = i == depth
                if last:
                    # Only the last position's state is read after the last layer.
                    h, x, m = h[-1:], x[-1:], mask[-1:]
                    q = attn.q_proj(h).view(1, heads, head_dim).transpose(0, 1)
                    q = self._rope(q, p + n - 1, 1)
                else:
                    m = mask
                    q = attn.q_proj(h).view(n, heads, head_dim).transpose(0, 1)
                    q = self._rope(q, p, n)
                rep = heads // kv_heads
                k = k.repeat_interleave(rep, dim=0)
                v = v.repeat_interleave(rep, dim=0)
                scores = torch.matmul(q, k.transpose(1, 2)) * (head_dim**-0.5) + m
                a = torch.matmul(torch.softmax(scores, dim=-1), v)
                a = a.transpose(0, 1).reshape(a.shape[1], heads * head_dim)
                x = x + attn.o_proj(a)
                h = block.post_attention_layernorm(x)
                x = x + block.mlp.down_proj(
                    torch.nn.functional.silu(block.mlp.gate_proj(h)) * block.mlp.up_proj(h)
                )
                if i in want:
                    out.append(self.norm(x[-1]) if i == n_layers else x[-1])
            self._kv = (keys, values)
            return torch.cat(out)[None]

    module = _Suffix().eval()
    if prefix:
        with torch.inference_mode():
            module(torch.tensor([list(prefix)]))
        keys, values = module._kv
        module.prefix_k = [k.clone() for k in keys]
        module.prefix_v = [v.clone() for v in values]
        module.p = len(prefix)
    return module


def smoothed(
    model: Any, layers: Sequence[int], prefix: Sequence[int], calibration: Sequence[Sequence[int]]
) -> Any:
    """A copy of ``model`` whose linear inputs are smoothed (see the module docstring).

    The copy computes the same function; only how the range is split between
    activations and weights changes. ``calibration``: full prompt ids (with
    the prefix), run after it as the served graph runs them.
    """
    import copy

    import torch

    model = copy.deepcopy(model)
    depth = max(int(x) for x in layers)
    module = suffix_module(model, layers, prefix)
    p = len(prefix)
    peak: dict[str, Any] = {}

    def record(name: str) -> Any:
        def hook(_mod: Any, inputs: Any, _out: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            peak[name] = torch.maximum(peak[name], x) if name in peak else x

        return hook

    hooks = []
    for i, block in enumerate(model.layers[:depth]):
        hooks.append(block.self_attn.q_proj.register_forward_hook(record(f"{i}.attn")))
        hooks.append(block.mlp.gate_proj.register_forward_hook(record(f"{i}.mlp")))
        hooks.append(block.mlp.down_proj.register_forward_hook(record(f"{i}.down")))
    with torch.inference_mode():
        for ids in calibration:
            module(torch.tensor([list(ids)[p:]]))
    for h in hooks:
        h.remove()

    def scale(name: str, weights: Sequence[Any]) -> Any:
        w = torch.stack([x.abs().amax(0) for x in weights]).amax(0).clamp(min=1e-5)
        a = SMOOTHING_ALPHA
        return peak[name].clamp(min=1e-5) ** a / w ** (1.0 - a)

    with torch.no_grad():
        for i, block in enumerate(model.layers[:depth]):
            attn, mlp = block.self_attn, block.mlp
            qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
            for name, norm, linears in (
                (f"{i}.attn", block.input_layernorm, qkv),
                (f"{i}.mlp", block.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                s = scale(name, [lin.weight for lin in linears])
                norm.weight.div_(s)
                for lin in linears:
                    lin.weight.mul_(s[None, :])
            s = scale(f"{i}.down", [mlp.down_proj.weight])
            mlp.down_proj.weight.mul_(s[None, :])
            mlp.up_proj.weight.div_(s[:, None])
    return model


def export(module: Any, file: Path) -> None:
    import torch

    ids = torch.tensor([[28, 1041, 2777, 30, 2]], dtype=torch.long)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (ids,),
            str(file),
            dynamo=False,
            input_names=["input_ids"],
            output_names=["features"],
            dynamic_axes={"input_ids": {1: "tokens"}},
            opset_version=17,
        )


def graph_key(
    gguf: Path,
    layers: Sequence[int],
    prefix: Sequence[int],
    calibration: Sequence[Sequence[int]],
    variant: str,
) -> str:
    h = hashlib.sha256()
    h.update(gguf.name.encode())
    h.update(str(gguf.stat().st_size).encode())
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(
        f"L{list(layers)}|P{list(prefix)}|C{[list(c) for c in calibration]}|a{SMOOTHING_ALPHA}"
        f"|{variant}|graph{GRAPH_VERSION}|{onnx_export.library_versions()}".encode()
    )
    return h.hexdigest()[:16]


class SuffixSession:
    """One ORT session over the cached graph; ``run`` is called by one thread at a time."""

    def __init__(self, file: Path, threads: int) -> None:
        self.file = file
        self.session = onnx_export.cpu_session(file, threads)

    def run(self, suffix_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([list(suffix_ids)], dtype=np.int64)
        (features,) = self.session.run(None, {"input_ids": ids})
        return np.asarray(features[0], dtype=np.float32)


def build(
    model: Any,
    gguf: Path,
    layers: Sequence[int],
    prefix: Sequence[int],
    calibration: Sequence[Sequence[int]],
    variant: str,
    threads: int,
) -> SuffixSession:
    """The session for these features, exporting (and quantising) the graph if not cached.

    ``calibration``: the chat-template ids of :data:`CALIBRATION_PROMPTS` (int8 only).
    """
    onnx_export.check_variant(variant)
    if variant == "fp32":
        calibration = []
    key = graph_key(gguf, layers, prefix, calibration, variant)
    file = onnx_export.graph_file("smollm2", key, variant)

    def write(dst: Path) -> None:
        with onnx_export.scratch(file, "raw") as raw:
            smooth = smoothed(model, layers, prefix, calibration) if variant == "int8" else model
            export(suffix_module(smooth, layers, prefix), raw)
            if variant == "int8":
                onnx_export.quantise_int8(raw, dst, ["MatMul"])
            else:
                raw.replace(dst)

    def in_child() -> None:
        if os.environ.get(IN_EXPORTER) != "1":
            _export_in_child(layers, variant)

    onnx_export.export_once(file, write, before=in_child)
    return SuffixSession(file, threads)


def _export_in_child(layers: Sequence[int], variant: str) -> None:
    """Exports the graph in a fresh interpreter, so that nothing this process ran
    before (other models, bf16 autocast, thread-count changes) can move the
    calibration's float rounding: in one long-lived process the int8 graph came
    out different (and its features 0.008 of held-out tau lower) than in a fresh
    one. The child computes the same key, so the parent finds the file."""
    env = {**os.environ, IN_EXPORTER: "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", EXPORTER_MODULE]
    cmd += ["--layers", ",".join(str(int(x)) for x in layers), "--variant", variant]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(
            f"exporting the SmolLM2 {variant} graph failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-2000:]}"
        )
