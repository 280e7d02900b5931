"""SmolLM2-135M-Instruct with iteration-level continuous batching on CPU.

The batch keeps one KV cache, left-padded so that every row ends at the same
column: a decode step feeds each row its last sampled token with its own
position id and an attention mask that hides the padding. A joining sequence
is prefilled alone (no padding inside a prompt) and its cache is merged in;
a leaving sequence's row is dropped and the all-padding columns at the left
are trimmed. Nothing is recomputed when the batch changes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.worker.triton.engine import Sequence
from shortline.common.models import smollm2_gguf_path

log = logging.getLogger(__name__)


class GrowingLayer(DynamicLayer):
    """A KV cache layer that writes each step's keys and values in place.

    transformers' ``DynamicLayer`` concatenates the whole cache with the new
    column at every step, which copied ~16% of a decode step's CPU time at
    batch 8 and about 90 columns (and grows with the length). Here the
    tensors live in a buffer with spare columns and ``keys``/``values`` are
    views of its filled part; the buffer is reallocated (half as large
    again) only when it is full.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64) -> None:
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._filled = keys.shape[-2]
        self._k = self._buffer(keys, self._filled + spare)
        self._v = self._buffer(values, self._filled + spare)
        self._expose()

    @staticmethod
    def _buffer(t: torch.Tensor, columns: int) -> torch.Tensor:
        b, h, n, d = t.shape
        buf = t.new_empty(b, h, columns, d)
        buf[:, :, :n].copy_(t)
        return buf

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._k[:, :, : self._filled], self._v[:, :, : self._filled]
        self.keys, self.values = keys, values
        return keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._filled, self._filled + key_states.shape[-2]
        if end > self._k.shape[-2]:
            columns = end + max(64, end // 2)
            self._k = self._buffer(self._k[:, :, :start], columns)
            self._v = self._buffer(self._v[:, :, :start], columns)
        self._k[:, :, start:end].copy_(key_states)
        self._v[:, :, start:end].copy_(value_states)
        self._filled = end
        return self._expose()


def growing_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A ``DynamicCache`` holding ``layers`` in :class:`GrowingLayer` s."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer(k, v) for k, v in layers]
    return cache


@dataclass
class _SeqState:
    prompt_ids: list[int]
    # Next position id (tokens of this sequence already in the cache).
    position: int
    last_token: int
    generator: torch.Generator | None


class SmolLM2Backend:
    def __init__(self, max_batch: int = 16, threads: int = 0, precision: str = "bf16") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads > 0:
            torch.set_num_threads(threads)
        path = smollm2_gguf_path()
        started = time.perf_counter()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        self.model.eval()
        self.precision = precision
        if precision == "int8":
            # Dynamic int8 linears: on two cores a decode step is bound by reading
            # weights, so this is much faster, but it changes greedy answers of this
            # 135M model into nonsense ("I'm not a helpful AI..."): opt-in only.
            import warnings

            from torch.ao.quantization import quantize_dynamic

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        elif precision == "bf16":
            model: Any = self.model
            self.model = model.to(torch.bfloat16)
        elif precision != "fp32":
            raise ValueError(f"precision must be int8, bf16 or fp32, got {precision!r}")
        log.info("loaded %s in %.1f s", path.name, time.perf_counter() - started)
        self.max_batch = max_batch
        eos = self.tokenizer.eos_token_id
        self._eos = {eos} if eos is not None else set()
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0:
            self._eos.add(im_end)
        self._rows: list[Sequence] = []
        # Per model layer: keys and values of the batch, [batch, kv_heads, columns, head_dim].
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask: torch.Tensor | None = None
        # Built from ``_layers`` when the batch changes, then grown in place by each step.
        self._cache_obj: Any = None

    def is_eos(self, token: int) -> bool:
        return token in self._eos

    def text_of(self, seq: Sequence) -> str:
        return str(self.tokenizer.decode(seq.token_ids, skip_special_tokens=True))

    def _cache(self) -> Any:
        if self._cache_obj is None:
            self._cache_obj = growing_cache(self._layers)
        return self._cache_obj

    def _set_layers(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._layers = layers
        self._cache_obj = None

    @torch.inference_mode()
    def step(self, running: list[Sequence], joining: list[Sequence]) -> list[int]:
        assert running == self._rows, "engine and backend disagree on the batch"
        logits: list[torch.Tensor] = []
        if running:
            assert self._mask is not None
            ids = torch.tensor([[s.state.last_token] for s in running])
            pos = torch.tensor([[s.state.position] for s in running])
            mask = torch.cat([self._mask, torch.ones(len(running), 1, dtype=self._mask.dtype)], 1)
            cache = self._cache()
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
            )
            self._layers = [(layer.keys, layer.values) for layer in cache.layers]
            self._mask = mask
            for s in running:
                s.state.position += 1
            logits.append(out.logits[:, -1, :])
        joined: list[Sequence] = []
        for seq in joining:
            try:
                logits.append(self._prefill(seq))
            except Exception as exc:  # this prompt alone: the batch goes on without it
                log.warning("prefill of %s failed: %s", seq.request_id, type(exc).__name__)
                seq.error = f"prefill failed: {type(exc).__name__}"
                continue
            joined.append(seq)
        batch = running + joined
        sampled = iter(self._sample(torch.cat(logits, 0).float(), batch) if batch else [])
        self._rows = batch
        tokens: list[int] = []
        for seq in running + joining:
            if seq.error is not None:
                tokens.append(-1)  # never used: the engine ends this sequence
                continue
            seq.state.last_token = next(sampled)
            tokens.append(seq.state.last_token)
        return tokens

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        prompt_ids = self.tokenizer(seq.prompt, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            prompt_ids = [self.tokenizer.bos_token_id or 0]
        generator = None
        if seq.params.seed is not None:
            generator = torch.Generator().manual_seed(seq.params.seed)
        seq.state = _SeqState(prompt_ids, len(prompt_ids), -1, generator)
        seq.prompt_tokens = len(prompt_ids)
        ids = torch.tensor([prompt_ids])
        cache: Any = DynamicCache()
        # Only the last position's logits are needed: skipping the others saves the
        # lm_head matmul (49152 x 576) for every prompt token.
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        new = [(layer.keys, layer.values) for layer in cache.layers]
        self._merge(new, len(prompt_ids))
        result: torch.Tensor = out.logits[:, -1, :]
        return result

    def _merge(self, new: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        new_mask = torch.ones(1, length, dtype=torch.long)
        if self._mask is None or not self._layers:
            self._set_layers(new)
            self._mask = new_mask
            return
        old_len = self._mask.shape[1]
        width = max(old_len, length)

        def pad(t: torch.Tensor, to: int) -> torch.Tensor:
            if t.shape[-2] == to:
                return t
            shape = list(t.shape)
            shape[-2] = to - t.shape[-2]
            return torch.cat([t.new_zeros(shape), t], dim=-2)

        self._set_layers(
            [
                (
                    torch.cat([pad(k, width), pad(nk, width)], 0),
                    torch.cat([pad(v, width), pad(nv, width)], 0),
                )
                for (k, v), (nk, nv) in zip(self._layers, new, strict=True)
            ]
        )
        self._mask = torch.cat(
            [
                torch.nn.functional.pad(self._mask, (width - old_len, 0)),
                torch.nn.functional.pad(new_mask, (width - length, 0)),
            ],
            0,
        )

    def leave(self, seqs: list[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        keep = [i for i, s in enumerate(self._rows) if id(s) not in gone]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep or self._mask is None:
            self._set_layers([])
            self._mask = None
            return
        index = torch.tensor(keep)
        mask = self._mask.index_select(0, index)
        # Columns that are padding in every remaining row can go.
        first = int(mask.any(0).nonzero()[0].item())
        self._mask = mask[:, first:]
        self._set_layers(
            [
                (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                for k, v in self._layers
            ]
        )

    def _sample(self, logits: torch.Tensor, batch: list[Sequence]) -> list[int]:
        """One token per row. A row whose scores turn into inf or nan (a temperature
        or penalty so small that dividing by it overflows) falls back to greedy over
        its finite logits: one sequence's numbers never fail the others."""
        greedy = logits.argmax(-1).tolist()
        tokens: list[int] = []
        for row, seq in enumerate(batch):
            p = seq.params
            if p.temperature == 0.0 and p.repetition_penalty == 1.0:
                tokens.append(int(greedy[row]))
                continue
            token = self._sample_row(logits[row], seq)
            if token is None:
                log.debug("%s: non-finite sampling scores, greedy instead", seq.request_id)
                raw = logits[row]
                token = int(raw.masked_fill(~torch.isfinite(raw), float("-inf")).argmax().item())
            tokens.append(token)
        return tokens

    @staticmethod
    def _sample_row(scores: torch.Tensor, seq: Sequence) -> int | None:
        """The row's token, or None when its scores or probabilities are not finite."""
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.state.prompt_ids) | set(seq.token_ids)))
            picked = scores[seen]
            scores = scores.clone()
            scores[seen] = torch.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if p.temperature == 0.0:
            # -inf is a masked token, fine for argmax; +inf and nan are not.
            if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()):
                return None
            return int(scores.argmax().item())
        scores = scores / p.temperature
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, -1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = sorted_probs.cumsum(-1)
            drop = cumulative - sorted_probs > p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
            return None
        return int(torch.multinomial(probs, 1, generator=seq.state.generator).item())


def default_threads() -> int:
    return int(os.environ.get("SHORTLINE_SMOLLM2_THREADS", "0"))
