"""How well can any prompt-only length predictor order a target's answers? A reference ceiling.

Run: ``.venv/bin/python -m bench.predictor.ceiling``. For each shipped target,
Kendall's tau between its true output lengths and the mean log(1 + tokens) of
every OTHER alpaca_eval model's answer to the same instruction, on the val and
test splits: a predictor with perfect knowledge of how long answers to this
prompt typically are, and nothing about the target. The gap between it and a
head's tau is the model's share; the gap above it is the target's own habits
and sampling. Prints a table and writes ``bench/results/predictor_ceiling.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from services.predictor.heads import SHIPPED_HEADS_DIR, load_target
from shortline.common import dataset, paths
from shortline.common.stats import kendall_tau

RESULTS = Path(__file__).resolve().parent.parent / "results"


def tau_where_known(x: np.ndarray, y: list[float]) -> float:
    """Kendall's tau over the rows where ``y`` is known (NaN: that model has no answer
    to this instruction), as scipy's ``nan_policy="omit"``."""
    other = np.asarray(y, dtype=np.float64)
    known = ~np.isnan(other)
    return kendall_tau(x[known], other[known])


def consensus_tau(
    lengths: dict[str, dict[str, int]], target: str, split: str
) -> tuple[int, float, float, float]:
    """(n, tau of the others' mean log length, median and best tau of a single other model)."""
    instructions = [i for i in lengths[target] if dataset.split_of(i) == split]
    actual = np.array([lengths[target][i] for i in instructions], dtype=np.float64)
    others = [m for m in lengths if m != target]
    mean_log = [
        np.mean([np.log1p(lengths[m][i]) for m in others if i in lengths[m]]) for i in instructions
    ]
    singles = [
        tau_where_known(actual, [lengths[m].get(i, np.nan) for i in instructions]) for m in others
    ]
    return (
        len(instructions),
        kendall_tau(actual, mean_log),
        float(np.median(singles)),
        float(np.max(singles)),
    )


def main() -> int:
    root = paths.data_dir() / "prompts" / "alpaca_eval"
    if not root.is_dir():
        print(f"error: no alpaca_eval data under {root}", file=sys.stderr)
        return 2
    models = sorted(p.name for p in root.iterdir() if (p / "model_outputs.json").is_file())
    lengths = {
        m: {e.instruction: e.output_tokens for e in dataset.load_examples(m)} for m in models
    }
    targets = sorted(p.parent.name for p in SHIPPED_HEADS_DIR.glob("*/card.json"))
    result: dict[str, dict[str, object]] = {}
    print(
        f"| target | ceiling test | ceiling val | default head test | others ({len(models) - 1}) |"
    )
    print("|---|---|---|---|---|")
    for target in targets:
        row: dict[str, object] = {}
        for split in ("val", "test"):
            n, tau, median_single, best_single = consensus_tau(lengths, target, split)
            row[split] = {
                "n": n,
                "tau_mean_log_others": tau,
                "tau_median_single_other": median_single,
                "tau_best_single_other": best_single,
            }
        card = load_target(SHIPPED_HEADS_DIR / target).card
        head_tau = card["heads"][card["default_head"]]["test_metrics"]["kendall_tau"]
        row["default_head_test_tau"] = head_tau
        result[target] = row
        test, val = row["test"], row["val"]
        assert isinstance(test, dict) and isinstance(val, dict)
        print(
            f"| {target} | {test['tau_mean_log_others']:.3f} | {val['tau_mean_log_others']:.3f} | "
            f"{head_tau:.3f} | best single {test['tau_best_single_other']:.3f}, "
            f"median {test['tau_median_single_other']:.3f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predictor_ceiling.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
