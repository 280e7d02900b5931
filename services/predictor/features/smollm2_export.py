"""``python -m services.predictor.features.smollm2_export --layers 20 --variant int8``.

The SmolLM2 graph's export in a fresh interpreter: ``smollm2_onnx`` starts this
module by name when the graph is not cached (why: see ``smollm2_onnx._export_in_child``).
It builds the torch extractor in fp32 with the template prefix, what the
``onnx-int8`` backend builds on, and writes the graph where the parent looks.
"""

from __future__ import annotations

import argparse
import os

from services.predictor.features import onnx_export, smollm2_onnx
from services.predictor.features.smollm2 import SmolLM2Features
from shortline.common.models import smollm2_gguf_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exports the SmolLM2 feature graph to .run")
    parser.add_argument("--layers", required=True, help="comma list of 1-based decoder layers")
    parser.add_argument("--variant", choices=onnx_export.VARIANTS, required=True)
    args = parser.parse_args(argv)
    os.environ[smollm2_onnx.IN_EXPORTER] = "1"
    layers = tuple(int(x) for x in args.layers.split(","))
    fx = SmolLM2Features(layers, precision="fp32", reuse_prefix=True, threads=1)
    calibration = (
        [fx.prompt_ids(t) for t in smollm2_onnx.CALIBRATION_PROMPTS]
        if args.variant == "int8"
        else []
    )
    smollm2_onnx.build(
        fx.model, smollm2_gguf_path(), fx.layers, fx.prefix, calibration, args.variant, 1
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
