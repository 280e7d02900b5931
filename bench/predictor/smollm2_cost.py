"""CPU per prompt of the SmolLM2 feature backends, and how far each moves the features.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m bench.predictor.smollm2_cost``
(``--backends torch,onnx-int8``, ``--layers 20``).
The 173 test instructions of the split, one at a time (as the service runs
them), one thread, timed with ``time.process_time`` (tokenisation included),
so the figure holds on a shared machine better than wall-clock. Against the fp32
full run (the torch cards' training recipe): the median and largest relative L2
distance of a prompt's feature vector. Writes ``bench/results/smollm2_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent.parent / "results"
TARGET = "Meta-Llama-3-8B-Instruct"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predictor.smollm2_cost")
    parser.add_argument("--backends", default="torch,onnx-int8")
    parser.add_argument("--layers", default="20")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from services.predictor.features.smollm2 import SmolLM2Features
    from services.predictor.training import sources

    layers = tuple(int(x) for x in args.layers.split(","))
    data = sources.from_alpaca(TARGET)
    texts = [data.instructions[i] for i in data.indices("test")]
    ref = SmolLM2Features(layers, threads=1, precision="fp32", reuse_prefix=False)
    reference = ref.encode_features(texts)
    rows = []
    for backend in args.backends.split(","):
        extractor = SmolLM2Features(layers, threads=1, backend=backend)
        extractor.encode_features(texts[:3])
        start = time.process_time()
        feats = extractor.encode_features(texts)
        ms = (time.process_time() - start) / len(texts) * 1000
        rel = np.linalg.norm(feats - reference, axis=1) / np.linalg.norm(reference, axis=1)
        rows.append(
            {
                "backend": backend,
                "precision": extractor.precision if backend == "torch" else "int8",
                "layers": list(layers),
                "cpu_ms_per_prompt": round(ms, 1),
                "rel_l2_vs_fp32_median": round(float(np.median(rel)), 4),
                "rel_l2_vs_fp32_max": round(float(rel.max()), 4),
            }
        )
    load = os.getloadavg()[0]
    print(f"SmolLM2 features, {len(texts)} test instructions, one thread (load {load:.1f})")
    print("| backend | CPU ms per prompt | rel. L2 vs fp32, median / max |")
    print("|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} ({r['precision']}) | {r['cpu_ms_per_prompt']} | "
            f"{r['rel_l2_vs_fp32_median']} / {r['rel_l2_vs_fp32_max']} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"prompts": len(texts), "load_1min": load, "rows": rows}
    (RESULTS / "smollm2_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
