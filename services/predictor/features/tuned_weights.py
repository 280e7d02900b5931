"""Reading tuned MiniLM weights: a ``.pt`` state dict of the top layers, or a ``.npz`` delta.

The ``.npz`` is the low-rank delta that ``training/distill.py`` writes (a few MB
instead of 90); the ``.pt`` is what ``predictor train --finetune-top-layers`` saves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def tuned_state(base: dict[str, Any], path: Path) -> dict[str, Any]:
    """The tensors that ``path`` sets, to load over ``base`` with ``strict=False``."""
    import torch

    if path.suffix == ".npz":
        return delta_state(base, path)
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def delta_state(base: dict[str, Any], path: Path) -> dict[str, Any]:
    """The tensors that ``path`` changes, as ``base`` plus the stored delta.

    A weight matrix's delta is stored as two factors (``<name>::u`` @ ``<name>::v``),
    anything else whole (``<name>::d``): fine-tuning moves MiniLM's weights by
    nearly low-rank steps, so the delta ships in ~2 MB instead of 90.
    """
    import torch

    out: dict[str, Any] = {}
    with np.load(path) as data:
        names = {key.rsplit("::", 1)[0] for key in data.files}
        for name in sorted(names):
            if name not in base:
                raise ValueError(f"{path}: {name!r} is not a weight of the encoder")
            if f"{name}::d" in data.files:
                delta = torch.from_numpy(data[f"{name}::d"].astype(np.float32))
            else:
                u = torch.from_numpy(data[f"{name}::u"].astype(np.float32))
                v = torch.from_numpy(data[f"{name}::v"].astype(np.float32))
                delta = u @ v
            if delta.shape != base[name].shape:
                raise ValueError(
                    f"{path}: {name!r} delta has shape {tuple(delta.shape)}, "
                    f"the encoder's is {tuple(base[name].shape)}"
                )
            out[name] = base[name].float() + delta
    return out
