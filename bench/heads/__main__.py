"""Which shipped heads should be the default: stock MiniLM or the distilled encoder.

Issue 18 asks for the distilled heads as the default only if two measurements
confirm them, for every shipped target:

1. held-out Kendall's tau of the default head on the test split (the 173
   alpaca_eval instructions no head or encoder was trained on), as
   ``shortline predictor eval`` measures it with the served features;
2. the share of the non-preemptive oracle's mean-JCT gain that ssjf captures
   with those predictions (``shortline simulate``, rho 0.9, none / dynamic /
   continuous batching, several seeds), since ordering, not tau, is what users feel.

Each measurement runs the project's own command in a subprocess with
``SHORTLINE_PREDICTOR_HEADS_DIR`` pointing at one head set, so what is measured
is exactly what an operator would run.

    .venv/bin/python -m bench.heads [--requests 5000] [--seeds 3] [--quick]

Prints a table, writes ``bench/results/heads.json`` and ``heads.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from services.predictor.heads import ARTIFACTS_DIR, DISTILLED_HEADS_DIR, STOCK_HEADS_DIR

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEAD_SETS = {"stock": STOCK_HEADS_DIR, "distilled": DISTILLED_HEADS_DIR}
MODES = ("none", "dynamic", "continuous")
SHORTLINE = (sys.executable, "-m", "shortline.cli")


def targets(folder: Path) -> list[str]:
    return sorted(p.parent.name for p in folder.glob("*/card.json"))


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "SHORTLINE_PREDICTOR_HEADS_DIR": str(folder)}


def held_out_tau(folder: Path, target: str) -> dict[str, Any]:
    """``shortline predictor eval --json`` on the test split: tau per head, and the default."""
    out = subprocess.run(
        [
            *SHORTLINE,
            "predictor",
            "eval",
            "--json",
            "--target-model",
            target,
            "--heads-dir",
            str(folder),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=_env(folder),
    ).stdout
    report: dict[str, Any] = json.loads(out[out.index("{") :])
    return report


def oracle_share(folder: Path, target: str, requests: int, seed: int) -> dict[str, float]:
    """ssjf's share of the non-preemptive oracle's mean-JCT gain, per batching mode."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sim.json"
        flags = {
            "--target-model": target,
            "--requests": str(requests),
            "--seed": str(seed),
            "--rho": "0.9",
            "--policies": "fcfs,ssjf,sjf-oracle",
            "--batching": ",".join(MODES),
            "--out": str(path),
        }
        subprocess.run(
            [*SHORTLINE, "simulate", *(x for kv in flags.items() for x in kv)],
            capture_output=True,
            check=True,
            env=_env(folder),
        )
        rows = json.loads(path.read_text())["rows"]
    return {r["batching"]: float(r["oracle_share"]) for r in rows if r["policy"] == "ssjf"}


def default_tau(report: dict[str, Any]) -> tuple[str, float]:
    heads = report["heads"]
    name = str(report["default_head"])
    return name, float(heads[name]["kendall_tau"])


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["targets"])
    fig, axes = plt.subplots(1, 1 + len(MODES), figsize=(4 * (1 + len(MODES)), 3.6))
    width = 0.38
    xs = range(len(names))
    panels = [("held-out tau (default head)", "tau")] + [
        (f"ssjf oracle share, {m}", m) for m in MODES
    ]
    for ax, (title, key) in zip(axes, panels, strict=True):
        for k, label in enumerate(HEAD_SETS):
            values = [results["targets"][t][label][key] for t in names]
            ax.bar([x + (k - 0.5) * width for x in xs], values, width, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(list(xs), [n[:12] for n in names], rotation=40, fontsize=7)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one seed, 2000 requests")
    args = parser.parse_args()
    requests, seeds = (2000, 1) if args.quick else (args.requests, args.seeds)
    results: dict[str, Any] = {
        "requests": requests,
        "seeds": seeds,
        "rho": 0.9,
        "head_sets": {
            k: str(v.relative_to(ARTIFACTS_DIR.parent.parent.parent)) for k, v in HEAD_SETS.items()
        },
        "targets": {},
    }
    header = "| target | heads | default head | held-out tau | " + " | ".join(
        f"oracle share {m}" for m in MODES
    )
    lines = [header + " |", "|" + "---|" * (4 + len(MODES))]
    for target in targets(HEAD_SETS["stock"]):
        per: dict[str, Any] = {}
        for label, folder in HEAD_SETS.items():
            head, tau = default_tau(held_out_tau(folder, target))
            shares = [oracle_share(folder, target, requests, 1 + s) for s in range(seeds)]
            row: dict[str, Any] = {"default_head": head, "tau": tau}
            for m in MODES:
                row[m] = statistics.fmean(s[m] for s in shares)
                row[f"{m}_seeds"] = [s[m] for s in shares]
            per[label] = row
            cells = " | ".join(f"{row[m]:.0%}" for m in MODES)
            lines.append(f"| {target} | {label} | {head} | {tau:.3f} | {cells} |")
            print(lines[-1], flush=True)
        per["distilled_better"] = {
            key: per["distilled"][key] > per["stock"][key] for key in ("tau", *MODES)
        }
        results["targets"][target] = per
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "heads.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "heads.png")
    print(f"wrote {RESULTS / 'heads.json'} and heads.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
