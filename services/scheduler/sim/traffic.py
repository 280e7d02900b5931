"""An operator's own traffic as a simulation workload: a JSONL or CSV file, or the
scheduler's outcome log.

``shortline simulate --workload FILE`` and ``--from-log PATH`` replay these requests
under every policy, so the question "what would ssjf have gained on my traffic?" is
answered before switching. Arrival times are used as given (the runner rescales them
only with ``--rescale-arrivals``).

File format (one request per JSONL object or CSV row; CSV has a header row):

- ``arrival_s`` (required): seconds, >= 0, in any order (sorted here, stably);
- ``true_tokens`` (required): the output length the request really had, an integer >= 1;
- ``predicted_tokens`` or ``prompt``: a row's prediction is used as given; a row
  without one is predicted by ``--predictor`` (``real`` predicts from the prompt);
- ``prompt_tokens`` (optional, default 0): only prefill (``--prefill-us-per-token``) uses it;
- ``priority`` (optional integer) and ``tenant`` (optional string): read and kept with
  the workload; the policies simulated today do not order by them.

Any other column is an error, as is anything malformed: every error names the file, the
line and the field. Files are bounded (:data:`MAX_BYTES`, :data:`MAX_ROWS`).

The outcome log (``shortline.common.outcomes``) records each request's completion time
(``ts``, unix) and its JCT (``completion_s``): the arrival is ``ts - completion_s``.
Only rows that finished normally (``stop``, ``length``) carry a real length; the others
are skipped and counted by reason. The log keeps no prompt token count: it is
estimated at :data:`CHARS_PER_TOKEN` characters per token from ``prompt_chars``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sqlite3
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.scheduler.sim import workload as wl
from shortline.common.outcomes import FINISHED_REASONS

MAX_BYTES = 512 << 20  # a workload file larger than this is refused before reading
MAX_ROWS = 1_000_000  # requests per workload file, and the newest rows read from a log
MAX_TENANT_CHARS = 256
CHARS_PER_TOKEN = 4.0  # the log's prompt_chars -> prompt tokens (prefill only)

REQUIRED = ("arrival_s", "true_tokens")
OPTIONAL = ("predicted_tokens", "prompt", "prompt_tokens", "priority", "tenant")
COLUMNS = REQUIRED + OPTIONAL


class TrafficError(ValueError):
    """A workload file or outcome log that cannot be replayed; the message names where."""


@dataclass
class Traffic:
    """Requests in arrival order; ``predicted`` is NaN where the source gave none."""

    arrivals: NDArray[np.float64]
    true_tokens: NDArray[np.int64]
    predicted: NDArray[np.float64]
    prompts: list[str | None]
    prompt_tokens: NDArray[np.int64]
    priority: NDArray[np.int64] | None
    tenant: list[str] | None
    name: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.arrivals.shape[0])


@dataclass
class _Row:
    arrival: float
    true_tokens: int
    predicted: float = math.nan
    prompt: str | None = None
    prompt_tokens: int = 0
    priority: int | None = None
    tenant: str | None = None


def _where(path: Path, line: int, name: str) -> str:
    return f"{path}:{line}: {name}"


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):  # a JSON true is not a number
        raise TrafficError(f"{where}: expected a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TrafficError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise TrafficError(f"{where}: must be finite, got {value!r}")
    return x


def _integer(value: Any, where: str, low: int) -> int:
    x = _number(value, where)
    if x != int(x):
        raise TrafficError(f"{where}: expected an integer, got {value!r}")
    if x < low:
        raise TrafficError(f"{where}: must be >= {low}, got {value!r}")
    return int(x)


def _row(fields: dict[str, Any], path: Path, line: int, need_prediction: bool) -> _Row:
    """One request from its fields (missing and empty are the same), or a named error."""
    unknown = sorted(set(fields) - set(COLUMNS))
    if unknown:
        raise TrafficError(
            f"{_where(path, line, unknown[0])}: unknown column; the columns are "
            f"{', '.join(COLUMNS)}"
        )
    present = {k: v for k, v in fields.items() if v is not None and v != ""}
    for name in REQUIRED:
        if name not in present:
            raise TrafficError(f"{_where(path, line, name)}: missing (required)")
    arrival = _number(present["arrival_s"], _where(path, line, "arrival_s"))
    if arrival < 0:
        raise TrafficError(f"{_where(path, line, 'arrival_s')}: must be >= 0, got {arrival!r}")
    row = _Row(arrival, _integer(present["true_tokens"], _where(path, line, "true_tokens"), 1))
    if "predicted_tokens" in present:
        where = _where(path, line, "predicted_tokens")
        row.predicted = _number(present["predicted_tokens"], where)
        if row.predicted < 0:
            raise TrafficError(f"{where}: must be >= 0, got {row.predicted!r}")
    if "prompt" in present:
        if not isinstance(present["prompt"], str):
            raise TrafficError(f"{_where(path, line, 'prompt')}: expected a string")
        row.prompt = present["prompt"]
    if need_prediction and row.prompt is None and math.isnan(row.predicted):
        raise TrafficError(
            f"{_where(path, line, 'predicted_tokens')}: missing, and no prompt to predict "
            "from (give one of them, or --predictor oracle / noisy:SIGMA)"
        )
    if "prompt_tokens" in present:
        row.prompt_tokens = _integer(
            present["prompt_tokens"], _where(path, line, "prompt_tokens"), 0
        )
    if "priority" in present:
        row.priority = _integer(present["priority"], _where(path, line, "priority"), -(1 << 31))
    if "tenant" in present:
        tenant = present["tenant"]
        if not isinstance(tenant, str) or len(tenant) > MAX_TENANT_CHARS:
            raise TrafficError(
                f"{_where(path, line, 'tenant')}: expected a string of at most "
                f"{MAX_TENANT_CHARS} characters"
            )
        row.tenant = tenant
    return row


def _jsonl(text: str, path: Path, need_prediction: bool) -> list[_Row]:
    rows: list[_Row] = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TrafficError(f"{path}:{line}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TrafficError(f"{path}:{line}: expected a JSON object, one request a line")
        rows.append(_row(obj, path, line, need_prediction))
        if len(rows) > MAX_ROWS:
            raise TrafficError(f"{path}: more than {MAX_ROWS} requests (the limit)")
    return rows


def _csv(text: str, path: Path, need_prediction: bool) -> list[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise TrafficError(f"{path}:1: empty file; expected a header row ({', '.join(COLUMNS)})")
    names = [h.strip() for h in header]
    for name in names:
        if name not in COLUMNS:
            raise TrafficError(
                f"{_where(path, 1, name or '(empty)')}: unknown column; the columns are "
                f"{', '.join(COLUMNS)}"
            )
    if len(set(names)) != len(names):
        raise TrafficError(f"{path}:1: a column appears twice in the header")
    rows: list[_Row] = []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(names):
            raise TrafficError(f"{path}:{line}: {len(cells)} fields, the header has {len(names)}")
        rows.append(_row(dict(zip(names, cells, strict=True)), path, line, need_prediction))
        if len(rows) > MAX_ROWS:
            raise TrafficError(f"{path}: more than {MAX_ROWS} requests (the limit)")
    return rows


def read_workload_file(path: Path | str, *, need_prediction: bool = True) -> Traffic:
    """The requests of a JSONL (``.jsonl``, ``.json``) or CSV (``.csv``) file.

    ``need_prediction``: every row must carry a prediction or a prompt (the predictor is
    ``real``); with ``oracle`` or ``noisy`` neither is needed."""
    path = Path(path)
    if not path.is_file():
        raise TrafficError(f"workload file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise TrafficError(f"{path}: {size} bytes, more than the limit of {MAX_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrafficError(f"{path}: not UTF-8 text ({exc.reason})") from None
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl(text, path, need_prediction)
    elif suffix == ".csv":
        rows = _csv(text, path, need_prediction)
    else:
        raise TrafficError(f"{path}: unknown format {suffix!r}; name it .jsonl or .csv")
    if not rows:
        raise TrafficError(f"{path}: no requests")
    return _traffic(rows, str(path), {})


def _traffic(rows: list[_Row], name: str, skipped: dict[str, int]) -> Traffic:
    rows.sort(key=lambda r: r.arrival)  # stable: equal arrivals keep the file's order
    with_priority = any(r.priority is not None for r in rows)
    with_tenant = any(r.tenant is not None for r in rows)
    return Traffic(
        arrivals=np.asarray([r.arrival for r in rows], dtype=np.float64),
        true_tokens=np.asarray([r.true_tokens for r in rows], dtype=np.int64),
        predicted=np.asarray([r.predicted for r in rows], dtype=np.float64),
        prompts=[r.prompt for r in rows],
        prompt_tokens=np.asarray([r.prompt_tokens for r in rows], dtype=np.int64),
        priority=np.asarray([r.priority or 0 for r in rows], dtype=np.int64)
        if with_priority
        else None,
        tenant=[r.tenant or "" for r in rows] if with_tenant else None,
        name=name,
        skipped=skipped,
    )


_LOG_COLUMNS = (
    "ts",
    "completion_s",
    "predicted_tokens",
    "actual_tokens",
    "finish_reason",
    "prompt",
    "prompt_chars",
)


def read_outcome_log(path: Path | str, *, need_prediction: bool = True) -> Traffic:
    """The finished requests of the newest :data:`MAX_ROWS` rows of an outcome log.

    Skipped, and counted in ``skipped`` by reason: rows that did not finish normally
    (their reason: ``cancelled``, ``deadline``, ``error``...), rows without a usable
    time or length (``incomplete``), and, when the predictor needs a prompt, rows with
    neither a prediction nor a kept prompt (``no prediction``). Read-only: a running
    scheduler keeps writing."""
    path = Path(path)
    if not path.is_file():
        raise TrafficError(f"outcome log {path} does not exist")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            have = {str(r[1]) for r in conn.execute("PRAGMA table_info(outcomes)")}
            if not have:
                raise TrafficError(f"{path} has no outcomes table: is it a Shortline outcome log?")
            picked = ", ".join(c if c in have else f"NULL AS {c}" for c in _LOG_COLUMNS)
            found = conn.execute(
                f"SELECT {picked} FROM (SELECT * FROM outcomes ORDER BY id DESC LIMIT ?)"
                " ORDER BY id",
                (MAX_ROWS,),
            ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise TrafficError(f"{path} is not a readable SQLite outcome log: {exc}") from exc
    skipped: Counter[str] = Counter()
    rows: list[_Row] = []
    for ts, jct, predicted, actual, reason, prompt, chars in found:
        if reason not in FINISHED_REASONS:
            skipped[str(reason or "unknown")] += 1
            continue
        try:
            arrival = float(ts) - float(jct)
            tokens = int(actual)
        except (TypeError, ValueError):
            skipped["incomplete"] += 1
            continue
        if not math.isfinite(arrival) or tokens < 1:
            skipped["incomplete"] += 1
            continue
        pred = math.nan if predicted is None else float(predicted)
        if not pred >= 0:  # NaN (the request got no prediction) or nonsense
            pred = math.nan
        text = None if prompt is None else str(prompt)
        if need_prediction and text is None and math.isnan(pred):
            skipped["no prediction"] += 1
            continue
        n_chars = len(text) if text is not None else int(chars or 0)
        rows.append(
            _Row(
                arrival,
                tokens,
                pred,
                text,
                prompt_tokens=round(n_chars / CHARS_PER_TOKEN),
            )
        )
    if not rows:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "it is empty"
        raise TrafficError(f"{path}: no finished request to replay ({detail})")
    t0 = min(r.arrival for r in rows)
    for r in rows:
        r.arrival -= t0  # unix time -> seconds since the first arrival
    return _traffic(rows, f"outcome log {path}", dict(skipped))


def to_workload(
    traffic: Traffic,
    *,
    predictor_spec: str,
    target_model: str,
    rng: np.random.Generator,
    predictor: wl.LengthPredictor | None,
) -> wl.Workload:
    """The simulator's workload: the rows' own predictions, ``predictor_spec`` for the
    rest (``real`` from their prompts, ``oracle`` or ``noisy:SIGMA`` from their true
    lengths). Arrival times as given."""
    predicted = traffic.predicted.copy()
    missing = np.flatnonzero(np.isnan(predicted))
    source = "given"
    if missing.size:
        prompts = [traffic.prompts[i] for i in missing]
        real = predictor_spec == "real" or predictor_spec.startswith("real:")
        if real and any(p is None for p in prompts):
            raise TrafficError(
                f"{traffic.name}: {sum(p is None for p in prompts)} requests have neither a "
                "prediction nor a prompt for --predictor real"
            )
        lengths = wl.LengthSet(
            prompts=[p or "" for p in prompts] if real else [],
            prompt_tokens=traffic.prompt_tokens[missing],
            true_tokens=traffic.true_tokens[missing],
            name=traffic.name,
        )
        pred, src = wl.predictions_for(predictor_spec, lengths, target_model, rng, predictor)
        predicted[missing] = pred
        source = src if missing.size == len(traffic) else f"given+{src}"
    return wl.Workload(
        arrivals=traffic.arrivals,
        prompt_tokens=traffic.prompt_tokens,
        true_tokens=traffic.true_tokens,
        predicted=predicted,
        prediction_source=source,
        priority=traffic.priority,
        tenant=traffic.tenant,
        info={
            "source": traffic.name,
            "requests": len(traffic),
            "skipped": traffic.skipped,
            "with_priority": traffic.priority is not None,
            "with_tenant": traffic.tenant is not None,
        },
    )


def rescaled(work: wl.Workload, rate: float) -> wl.Workload:
    """``work`` with its arrival gaps scaled to mean rate ``rate`` (the pattern kept)."""
    observed = offered_rate(work.arrivals)
    if not observed > 0 or not rate > 0:
        raise TrafficError(f"{work.info.get('source')}: no arrival span to rescale to a load")
    arrivals = work.arrivals[0] + (work.arrivals - work.arrivals[0]) * (observed / rate)
    return replace(work, arrivals=arrivals, info={**work.info, "rescaled_to_rps": rate})


def offered_rate(arrivals: NDArray[np.float64]) -> float:
    """Mean arrival rate over the span of ``arrivals`` (NaN with fewer than two)."""
    span = float(arrivals[-1] - arrivals[0]) if arrivals.shape[0] else 0.0
    return (arrivals.shape[0] - 1) / span if span > 0 else math.nan
