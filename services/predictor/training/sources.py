"""Where training rows come from: alpaca_eval answers, or the scheduler's outcome log.

Both become the same :class:`TrainingData` (prompt, true output tokens, prompt
tokens, split), so the heads are trained and evaluated by one code path
whether they learn from public data or from the operator's own traffic.

An outcome log written with ``--outcome-log-prompts digest`` keeps no text: its
rows carry the predictor's 384-d sentence embedding instead, and heads for such
a log are fitted on that embedding (``TrainingData.embeddings``) rather than on
the encoder's multi-layer features, which need the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from services.predictor.features.minilm_backends import EMBEDDING_DIM
from shortline.common import dataset, outcomes, paths

LOG_INPUTS = ("auto", "text", "embedding")


@dataclass
class TrainingData:
    target_model: str
    source: str
    instructions: list[str]
    """Each row's prompt text; for a row known only by its digest, ``sha256:<hex>``."""
    tokens: np.ndarray
    prompt_tokens: np.ndarray
    splits: np.ndarray
    embeddings: np.ndarray | None = None
    """(n, 384) float32 sentence embeddings the heads take instead of the encoder's
    multi-layer features (training from a digest outcome log); a NaN row is to be
    encoded from its text. None: features from the text, as for alpaca_eval."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Finished rows left out, by reason."""

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def sizes(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in ("train", "val", "test")}

    def distinct(self, split: str) -> int:
        return len({self.instructions[i] for i in self.indices(split)})


def from_alpaca(target_model: str) -> TrainingData:
    examples = dataset.load_examples(target_model)
    prompt_counts = dataset.prompt_token_counts(target_model)
    instructions = [e.instruction for e in examples]
    return TrainingData(
        target_model=target_model,
        source=(
            f"alpaca_eval results/{target_model}/model_outputs.json "
            "(tatsu-lab/alpaca_eval, CC BY-NC 4.0), 805 instructions"
        ),
        instructions=instructions,
        tokens=np.array([e.output_tokens for e in examples], dtype=np.float64),
        prompt_tokens=np.array([prompt_counts[i] for i in instructions], dtype=np.float64),
        splits=np.array([dataset.split_of(i) for i in instructions]),
    )


def from_outcome_log(path: Path, target_model: str, log_input: str = "auto") -> TrainingData:
    """Rows of the scheduler's SQLite outcome log for ``target_model`` that finished.

    Only ``stop`` and ``length`` rows carry a real length (a cancelled or failed
    request says nothing about how long the answer would have been).

    ``log_input``: ``text`` fits on the prompts' text (rows without it are
    skipped); ``embedding`` fits on the 384-d sentence embeddings, the stored
    ones of digest rows and those of text rows computed again; ``auto`` is
    ``text`` when every usable row has its text, else ``embedding``. Rows with
    neither text nor an embedding (digest mode without a predictor, or the
    predictor failed) are skipped and counted.
    """
    if log_input not in LOG_INPUTS:
        raise ValueError(f"log input must be one of {', '.join(LOG_INPUTS)}, got {log_input!r}")
    rows = outcomes.read_rows(path, target_model)
    if not rows:
        raise ValueError(
            f"outcome log {path} has no finished rows with length_model = {target_model!r}"
        )
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    usable: list[outcomes.LoggedRow] = []
    for r in rows:
        if r.embedding is not None and r.embedding.shape != (EMBEDDING_DIM,):
            # Another encoder's vector: the heads could not be served on it.
            r = replace(r, embedding=None)
            skip(f"embedding not {EMBEDDING_DIM}-d")
        if r.prompt is None and r.embedding is None:
            skip("no text and no embedding")
        else:
            usable.append(r)
    if log_input == "auto":
        log_input = "text" if all(r.prompt is not None for r in usable) else "embedding"
    if log_input == "text":
        kept = [r for r in usable if r.prompt is not None]
        for _ in range(len(usable) - len(kept)):
            skip("no text (digest row; use --log-input embedding)")
        usable = kept
    if not usable:
        raise ValueError(
            f"outcome log {path}: none of its {len(rows)} finished rows for {target_model!r} "
            f"can train a head ({_describe(skipped)}); digest rows need the predictor's "
            "embedding, which the scheduler stores only when a predictor answered"
        )
    tokens = np.array([r.actual_tokens for r in usable], dtype=np.float64)
    if log_input == "text":
        instructions = [str(r.prompt) for r in usable]
        return TrainingData(
            target_model=target_model,
            source=_source(path, len(usable), "text", skipped),
            instructions=instructions,
            tokens=tokens,
            prompt_tokens=np.array(dataset.count_tokens(instructions), dtype=np.float64),
            splits=np.array([dataset.split_of(i) for i in instructions]),
            skipped=skipped,
        )
    embeddings = np.full((len(usable), EMBEDDING_DIM), np.nan, dtype=np.float32)
    for i, r in enumerate(usable):
        if r.embedding is not None:
            embeddings[i] = r.embedding
    digests = [r.prompt_sha256 or outcomes.prompt_digest(str(r.prompt)) for r in usable]
    stored = sum(r.embedding is not None for r in usable)
    return TrainingData(
        target_model=target_model,
        source=_source(path, len(usable), f"embedding ({stored} stored)", skipped),
        instructions=[
            r.prompt if r.prompt is not None else f"sha256:{d}"
            for r, d in zip(usable, digests, strict=True)
        ],
        tokens=tokens,
        # The digest keeps no token count: the prompt-length baseline uses characters.
        prompt_tokens=np.array(
            [r.prompt_chars if r.prompt_chars is not None else len(r.prompt or "") for r in usable],
            dtype=np.float64,
        ),
        # By digest, for text rows too: one prompt lands in one split however it was logged.
        splits=np.array([dataset.split_of(d) for d in digests]),
        embeddings=embeddings,
        skipped=skipped,
    )


def _describe(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} skipped: {why}" for why, n in skipped.items()) or "none skipped"


def _source(path: Path, n: int, used: str, skipped: dict[str, int]) -> str:
    return f"outcome log {path} ({n} finished rows, input {used}; {_describe(skipped)})"


def unlabelled_prompts(exclude: set[str]) -> list[str]:
    """First-turn prompts without answers (ShareGPT, MT-Bench), sorted, minus ``exclude``.

    They teach the encoder what the teacher sees in a prompt (distillation needs
    no lengths), so ``exclude`` must hold every held-out instruction: no val or
    test prompt is ever trained on, labelled or not.
    """
    import json

    root = paths.data_dir() / "prompts"
    texts: set[str] = set()
    for file in sorted((root / "sharegpt").glob("*.json")):
        for conv in json.loads(file.read_text()):
            turns = [t["value"] for t in conv.get("conversations", []) if t.get("from") == "human"]
            if turns and turns[0].strip():
                texts.add(turns[0])
    mt_bench = root / "mt_bench" / "question.jsonl"
    if mt_bench.is_file():
        for line in mt_bench.read_text().splitlines():
            if line.strip():
                texts.add(json.loads(line)["turns"][0])
    return sorted(texts - exclude)


@dataclass(frozen=True)
class HeldOut:
    """The newest rows of an outcome log, kept out of training to compare versions on."""

    first: int  # index of the first held-out row (rows are in log order, oldest first)
    rows: int
    total: int
    repeats: int  # older rows left out because their prompt is in the held-out window
    rule: str


def newest(data: TrainingData, n: int) -> TrainingData:
    """Only the newest ``n`` rows (the log's order is arrival order); ``n`` <= 0: all."""
    if n <= 0 or n >= len(data.instructions):
        return data
    if n < 14:
        raise ValueError(f"--newest {n}: at least 14 rows are needed (12 to train, 2 held out)")
    cut = len(data.instructions) - n
    return replace(
        data,
        instructions=data.instructions[cut:],
        tokens=data.tokens[cut:],
        prompt_tokens=data.prompt_tokens[cut:],
        splits=data.splits[cut:],
        embeddings=None if data.embeddings is None else data.embeddings[cut:],
        skipped={**data.skipped, "older than --newest": cut},
    )


# The share of the older rows' prompts that choose the epoch when the split rule gave
# val (almost) none: the newest ones, by prompt.
FALLBACK_VAL_SHARE = 0.15


def _ensure_val(instructions: list[str], splits: np.ndarray) -> None:
    """Moves the newest prompts of ``train`` to ``val`` when the split rule left val with
    fewer than 2 rows: a log whose prompts all fall in the rule's train part (say, one
    application's few hundred prompts) would otherwise not train at all. By prompt, so
    no prompt is in both."""
    if int((splits == "val").sum()) >= 2:
        return
    train = [i for i in range(len(splits)) if splits[i] == "train"]
    prompts: list[str] = []
    for i in reversed(train):
        if instructions[i] not in prompts:
            prompts.append(instructions[i])
    wanted = set(prompts[: max(2, int(len(prompts) * FALLBACK_VAL_SHARE))])
    for i in train:
        if instructions[i] in wanted:
            splits[i] = "val"


def hold_out_recent(data: TrainingData, share: float = 0.2, minimum: int = 50) -> HeldOut:
    """Marks the newest ``max(share of the rows, minimum)`` rows ``test``, in place.

    Traffic drifts: a version is judged on what came last, not on a random
    sample of the past. The older rows split into train and val by prompt
    (the one split rule, its ``test`` part joining val, which chooses the
    epoch and the default head); an older row whose prompt recurs in the
    held-out window is left out (``splits`` ``repeat``), so no held-out prompt is
    trained on. At least 12 rows stay for training (10 train, 2 val).
    """
    if not 0.0 < share < 1.0 or minimum < 1:
        raise ValueError(f"held-out share must be in (0, 1) and minimum >= 1: {share}, {minimum}")
    n = len(data.instructions)
    k = min(max(int(np.ceil(share * n)), minimum), n - 12)
    if k < 2:
        raise ValueError(f"outcome log has {n} usable rows: too few to hold out recent ones")
    first = n - k
    recent = set(data.instructions[first:])
    splits = np.where(data.splits[:first] == "test", "val", data.splits[:first]).astype(object)
    repeats = 0
    for i in range(first):
        if data.instructions[i] in recent:
            splits[i] = "repeat"
            repeats += 1
    _ensure_val(data.instructions, splits)
    data.splits = np.concatenate([splits, np.full(k, "test", dtype=object)]).astype(str)
    return HeldOut(
        first=first,
        rows=k,
        total=n,
        repeats=repeats,
        rule=(
            f"the newest max({share:.0%}, {minimum}) finished rows of the log (rows "
            f"{first + 1}..{n} of {n}, log order) are held out; older rows split by prompt "
            "into train and val, and those whose prompt recurs in the held-out rows are "
            "left out"
        ),
    )
