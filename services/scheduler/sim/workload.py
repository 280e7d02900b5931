"""The request sequence a simulation replays: arrivals, lengths, predictions.

Every policy and batching mode of one ``shortline simulate`` run sees the
same sequence. Arrivals come from the Azure 2023 production traces (their
inter-arrival gaps, tiled when more requests are asked for, rescaled to the
target rate) or a Poisson process. Lengths come from alpaca_eval responses
of a target model (prompt and true output tokens per instruction) or from the
trace's own GeneratedTokens.

Real predictions come from a :class:`LengthPredictor` the caller injects (the
composition root, ``shortline.simulation``, adapts the predictor's offline
API): no service imports another.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from shortline.common import paths

log = logging.getLogger(__name__)


class LengthPredictor(Protocol):
    """Predicted output tokens per prompt, in process (``--predictor real``)."""

    def predict(self, target_model: str, prompts: list[str], head: str | None) -> np.ndarray:
        """Predicted tokens (float) per prompt with ``head`` (None: the default head)."""
        ...

    def fingerprint(self, target_model: str) -> bytes:
        """Bytes that change when the heads change: part of the on-disk cache key."""
        ...


class DistributionPredictor(Protocol):
    """A :class:`LengthPredictor` that may also return quantiles (``QUANTILE_LEVELS``)."""

    def quantiles(
        self, target_model: str, prompts: list[str], head: str | None
    ) -> np.ndarray | None:
        """Quantiles per prompt (n x levels), or None when the predictor has none."""
        ...


@dataclass
class Workload:
    arrivals: NDArray[np.float64]  # seconds, non-decreasing
    prompt_tokens: NDArray[np.int64]
    true_tokens: NDArray[np.int64]
    predicted: NDArray[np.float64]
    prediction_source: str  # oracle, noisy, predictor
    info: dict[str, Any] = field(default_factory=dict)
    # Semantic identity per request (equal ids = the same prompt again), for the
    # semantic cache; None when the workload has no repeats to find.
    prompt_ids: NDArray[np.int64] | None = None
    # The max_tokens each request asks for; the core caps its prediction there (None: no
    # cap). Set where the live client sends one, so that the simulator sees the same keys.
    max_tokens: NDArray[np.int64] | None = None
    # Each request's priority band and tenant (own traffic, bench.priority); None: band 0,
    # one tenant.
    priority: NDArray[np.int64] | None = None
    tenant: list[str] | None = None
    # Each request's predicted length distribution as quantiles at QUANTILE_LEVELS
    # (n x levels); None: only the point is known.
    quantiles: NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return int(self.arrivals.shape[0])


def load_trace(kind: str) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """(seconds since the first request, context tokens, generated tokens) of an Azure trace."""
    path = paths.azure_trace(kind)
    if not path.is_file():
        raise FileNotFoundError(f"Azure trace {kind!r} not found at {path}")
    times: list[float] = []
    ctx: list[int] = []
    gen: list[int] = []
    with path.open() as f:
        next(f)
        for line in f:
            ts, c, g = line.rstrip("\n").split(",")
            # Seven fractional digits: more than fromisoformat takes; microseconds suffice.
            times.append(dt.datetime.fromisoformat(ts[:26]).timestamp())
            ctx.append(int(c))
            gen.append(int(g))
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return t, np.asarray(ctx)[order], np.asarray(gen)[order]


def arrival_times(
    source: str, n: int, rate: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """``n`` arrival times with mean rate ``rate``: ``poisson`` or an Azure trace's gaps."""
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    if source == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    else:
        t, _, _ = load_trace(source)
        base = np.diff(t)
        base = base[base >= 0]
        reps = -(-n // base.shape[0])
        gaps = np.tile(base, reps)[:n]
        gaps = gaps * (1.0 / rate) / float(base.mean())
    arrivals = np.cumsum(gaps)
    return arrivals - arrivals[0]


@dataclass(frozen=True)
class LengthSet:
    """Unique requests the sequence samples from."""

    prompts: list[str]  # empty for the trace (it has no text)
    prompt_tokens: NDArray[np.int64]
    true_tokens: NDArray[np.int64]
    name: str


def alpaca_lengths(target_model: str, split: str = "test") -> LengthSet:
    from shortline.common.dataset import load_examples, prompt_token_counts, split_of

    examples = load_examples(target_model)
    counts = prompt_token_counts(target_model)
    if split != "all":
        examples = [e for e in examples if split_of(e.instruction) == split]
    if not examples:
        raise ValueError(f"no alpaca_eval examples for {target_model!r} in split {split!r}")
    return LengthSet(
        prompts=[e.instruction for e in examples],
        prompt_tokens=np.asarray([counts[e.instruction] for e in examples], dtype=np.int64),
        true_tokens=np.asarray([max(1, e.output_tokens) for e in examples], dtype=np.int64),
        name=f"alpaca_eval/{target_model}/{split}",
    )


def trace_lengths(kind: str) -> LengthSet:
    _, ctx, gen = load_trace(kind)
    return LengthSet(
        prompts=[],
        prompt_tokens=ctx.astype(np.int64),
        true_tokens=np.maximum(gen, 1).astype(np.int64),
        name=f"azure2023/{kind}",
    )


def _real_predictions(
    predictor: LengthPredictor,
    target_model: str,
    prompts: list[str],
    head: str | None,
    kind: str = "",
) -> np.ndarray:
    """The shipped head's predictions for these prompts, computed once and cached on disk;
    ``kind`` "quantiles": the predictor's quantiles instead (its ``quantiles`` method)."""
    key: list[Any] = [target_model, head, prompts] + ([kind] if kind else [])
    h = hashlib.sha256(json.dumps(key, ensure_ascii=False).encode())
    # Retrained heads invalidate the cache: their files are part of the key.
    h.update(predictor.fingerprint(target_model))
    digest = h.hexdigest()[:16]
    cache_dir = paths.run_dir() / "sim" / "predictions"
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{target_model}-{head or 'default'}{kind and '-' + kind}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    log.info("predicting %d prompts for %s (cached at %s)", len(prompts), target_model, path)
    if kind:
        got = predictor.quantiles(target_model, prompts, head)  # type: ignore[attr-defined]
    else:
        got = predictor.predict(target_model, prompts, head)
    pred = np.asarray(got, dtype=np.float64)
    np.save(path, pred)
    return pred


def predictions_for(
    spec: str,
    lengths: LengthSet,
    target_model: str,
    rng: np.random.Generator,
    predictor: LengthPredictor | None = None,
) -> tuple[NDArray[np.float64], str]:
    """Per unique request: ``oracle``, ``noisy:SIGMA`` (true * lognormal) or ``real[:head]``
    (from ``predictor``, which ``real`` needs)."""
    true = lengths.true_tokens.astype(np.float64)
    if spec == "oracle":
        return true.copy(), "oracle"
    if spec.startswith("noisy:"):
        sigma = float(spec.split(":", 1)[1])
        return true * np.exp(sigma * rng.standard_normal(true.shape[0])), "noisy"
    if spec == "real" or spec.startswith("real:"):
        if not lengths.prompts:
            raise ValueError(
                "--predictor real needs prompt text; the Azure trace has none (use noisy:SIGMA)"
            )
        if predictor is None:
            raise ValueError(
                "--predictor real needs a length predictor: run through shortline.simulation"
            )
        head = spec.split(":", 1)[1] if ":" in spec else None
        return _real_predictions(predictor, target_model, lengths.prompts, head), "predictor"
    raise ValueError(f"unknown predictor {spec!r}; use oracle, noisy:SIGMA or real[:HEAD]")


# Held-out residual bins of the log-normal fallback: predicted-length terciles.
_RESIDUAL_BINS = 3


def distributions_for(
    spec: str,
    lengths: LengthSet,
    predicted: NDArray[np.float64],
    target_model: str,
    split: str,
    predictor: LengthPredictor | None = None,
    source: str = "auto",
) -> tuple[NDArray[np.float64] | None, str]:
    """Quantiles at ``QUANTILE_LEVELS`` per unique request, and where they came from.

    ``real``: the predictor's own quantiles when it has them; else a log-normal around
    each point prediction whose centre shift and sigma are the median and spread of
    the log residuals ``log(true / predicted)`` on the held-out val split, per
    predicted-length tercile (so short and long predictions may differ in spread).
    ``noisy:SIGMA``: a log-normal of that sigma (the noise's own). ``oracle``: None.
    ``source``: auto (as above), predictor (its quantiles or an error), residuals (the
    fallback even when the predictor has quantiles), none."""
    if source not in ("auto", "predictor", "residuals", "none"):
        raise ValueError(f"unknown distribution source {source!r}; use auto, predictor, ...")
    if source == "none":
        return None, "none (--distribution none)"
    from shortline.common.length_distribution import QUANTILE_LEVELS, lognormal_quantiles

    z = np.asarray(lognormal_quantiles(1.0, 1.0), dtype=np.float64)
    z = np.log(z)  # the standard normal's quantiles at the levels
    if spec.startswith("noisy:"):
        noise = float(spec.split(":", 1)[1])
        return predicted[:, None] * np.exp(noise * z)[None, :], f"log-normal, sigma {noise:g}"
    if not (spec == "real" or spec.startswith("real:")) or predictor is None:
        return None, "none (a point only)"
    if not lengths.prompts:
        return None, "none (no prompt text)"
    head = spec.split(":", 1)[1] if ":" in spec else None
    if source != "residuals" and callable(getattr(predictor, "quantiles", None)):
        probe = predictor.quantiles(target_model, lengths.prompts[:1], head)  # type: ignore[attr-defined]
        if probe is not None and probe.shape == (1, len(QUANTILE_LEVELS)):
            q = _real_predictions(predictor, target_model, lengths.prompts, head, "quantiles")
            return q, "predictor quantiles (predict_distribution)"
    if source == "predictor":
        raise ValueError("--distribution predictor: the predictor returns no quantiles")
    held = alpaca_lengths(target_model, "val" if split != "val" else "train")
    held_pred = _real_predictions(predictor, target_model, held.prompts, head)
    resid = np.log(held.true_tokens / np.maximum(held_pred, 1.0))
    edges = np.quantile(held_pred, np.linspace(0, 1, _RESIDUAL_BINS + 1)[1:-1])
    held_bin = np.searchsorted(edges, held_pred)
    shift = np.asarray([np.median(resid[held_bin == b]) for b in range(_RESIDUAL_BINS)])
    sigma = np.asarray([resid[held_bin == b].std() for b in range(_RESIDUAL_BINS)])
    b = np.searchsorted(edges, predicted)
    q = np.maximum(predicted, 1.0)[:, None] * np.exp(shift[b][:, None] + sigma[b][:, None] * z)
    how = ", ".join(f"{m:+.2f}/{s:.2f}" for m, s in zip(shift, sigma, strict=True))
    return q, (
        f"log-normal fallback: held-out {held.name} log residuals, shift/sigma per "
        f"predicted tercile {how}"
    )


def build(
    *,
    n: int,
    rate: float,
    arrivals: str,
    lengths: LengthSet,
    predicted_unique: NDArray[np.float64],
    prediction_source: str,
    seed: int,
    repeat_share: float = 0.0,
    quantiles_unique: NDArray[np.float64] | None = None,
) -> Workload:
    """``repeat_share`` of the requests repeat an earlier request of the sequence
    (same prompt, same true length, same prediction; drawn uniformly among the
    earlier ones); the others count as new prompts for the semantic cache."""
    if not 0.0 <= repeat_share < 1.0:
        raise ValueError(f"repeat share must be in [0, 1), got {repeat_share}")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, lengths.true_tokens.shape[0], size=n)
    arrival = arrival_times(arrivals, n, rate, rng)
    prompt_ids = None
    if repeat_share > 0:
        rep = np.random.default_rng(seed + 1)
        repeats = rep.random(n) < repeat_share
        earlier = (rep.random(n) * np.arange(n)).astype(np.int64)
        ids = np.arange(n, dtype=np.int64)
        for i in np.flatnonzero(repeats[1:]) + 1:
            j = earlier[i]
            pick[i] = pick[j]
            ids[i] = ids[j]
        prompt_ids = ids
    return Workload(
        arrivals=arrival,
        prompt_tokens=lengths.prompt_tokens[pick],
        true_tokens=lengths.true_tokens[pick],
        predicted=predicted_unique[pick],
        prediction_source=prediction_source,
        info={
            "lengths": lengths.name,
            "arrivals": arrivals,
            "rate_rps": rate,
            "seed": seed,
            "repeat_share": repeat_share,
        },
        prompt_ids=prompt_ids,
        quantiles=None if quantiles_unique is None else quantiles_unique[pick],
    )
