"""Where training rows come from: alpaca_eval answers, or the scheduler's outcome log.

Both become the same :class:`TrainingData` (prompt, true output tokens, prompt
tokens, split), so the heads are trained and evaluated by one code path
whether they learn from public data or from the operator's own traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shortline.common import dataset, outcomes, paths


@dataclass
class TrainingData:
    target_model: str
    source: str
    instructions: list[str]
    tokens: np.ndarray
    prompt_tokens: np.ndarray
    splits: np.ndarray

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


def from_outcome_log(path: Path, target_model: str) -> TrainingData:
    """Rows of the scheduler's SQLite outcome log for ``target_model`` that finished.

    Only ``stop`` and ``length`` rows carry a real length (a cancelled or failed
    request says nothing about how long the answer would have been).
    """
    rows = outcomes.read_lengths(path, target_model)
    if not rows:
        raise ValueError(
            f"outcome log {path} has no finished rows with length_model = {target_model!r}"
        )
    instructions = [str(r[0]) for r in rows]
    return TrainingData(
        target_model=target_model,
        source=f"outcome log {path} ({len(rows)} finished rows)",
        instructions=instructions,
        tokens=np.array([r[1] for r in rows], dtype=np.float64),
        prompt_tokens=np.array(dataset.count_tokens(instructions), dtype=np.float64),
        splits=np.array([dataset.split_of(i) for i in instructions]),
    )


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
