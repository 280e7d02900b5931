"""The ONNX Runtime pipeline every extractor's fast path shares: export once, quantise, run.

Each model brings its own parts (``minilm_onnx``: the pooled BERT graph, fused;
``smollm2_onnx``: the decoder suffix with the template prefix as constants,
smoothed); this module holds what they have in common:

- the cache: a graph is written once per key (a hash of the weights, the export
  settings and the library versions) under ``run_dir()/predictor/onnx`` as
  ``<model>-<key>-<variant>.onnx``, atomically (a scratch file, then a rename),
  one export at a time per process; graphs are never committed (90-400 MB);
- ``quantise_int8``: per-channel dynamic int8 weights (VNNI on this CPU);
- ``cpu_session``: the ORT session options the predictor runs every graph with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shortline.common import paths

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "int8")
_export_lock = threading.Lock()


def available() -> bool:
    """Whether onnxruntime (run) and onnx (export) can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"onnx variant must be one of {', '.join(VARIANTS)}, got {variant!r}")


def library_versions() -> str:
    """The part of every graph key that a torch or onnxruntime upgrade changes."""
    import onnxruntime
    import torch

    return f"torch{torch.__version__}|ort{onnxruntime.__version__}"


def graph_file(model: str, key: str, variant: str) -> Path:
    """Where the cached graph of ``model`` with this key and variant lives."""
    folder = paths.run_dir() / "predictor" / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{model}-{key}-{variant}.onnx"


@contextlib.contextmanager
def scratch(file: Path, label: str) -> Iterator[Path]:
    """A file beside ``file`` for an intermediate graph, removed afterwards."""
    path = file.with_name(f"{file.stem}.{label}{os.getpid()}.onnx")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def export_once(
    file: Path, write: Callable[[Path], None], before: Callable[[], None] | None = None
) -> None:
    """Makes sure ``file`` exists: ``write(path)`` writes the graph, then it is renamed into place.

    ``before`` runs first when the file is missing (under the same lock), e.g. an
    export in a child process that may leave the file there.
    """
    with _export_lock:
        if not file.exists() and before is not None:
            before()
        if file.exists():
            return
        start = time.perf_counter()
        with scratch(file, "tmp") as tmp:
            write(tmp)
            tmp.replace(file)
        log.info("exported %s in %.1f s", file.name, time.perf_counter() - start)


def quantise_int8(src: Path, dst: Path, op_types: list[str] | None = None) -> None:
    """Per-channel dynamic int8 weights (``op_types``: which ops; None = ORT's default)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a generic "consider pre-processing" advice on the root
    # logger; the graphs are quantised as they are on purpose, so the advice is noise.
    advice = _DropMessage("pre-processing before quantization")
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=op_types,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.getLogger().removeFilter(advice)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def cpu_session(file: Path, threads: int) -> Any:
    """An ORT CPU session as the predictor runs its graphs: sequential, ``threads``
    intra-op threads, full graph optimisation, no spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(threads, 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers would take the core the event loop and gRPC need
    # between passes (measured: halves served throughput on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
