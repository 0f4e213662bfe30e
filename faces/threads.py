"""The face networks run on one thread, in ONNX Runtime when it is installed (the lock installs it), else PyTorch.

float32 convolutions sum in an order that depends on the thread count (measured on the dlib ResNet in oneDNN:
1 vs 2 threads differ by about 1e-6 at most batch sizes), so on one thread an embedding or an expression score does
not depend on the process's thread settings, and curation rows stay identical across `--workers` and core counts.
It also costs nothing in throughput: these networks are small, and curation's workers are the parallelism.
PyTorch is imported only when a network runs in it (importing it costs a process about a CPU-second).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

RUNTIMES = ("auto", "onnxruntime", "torch")


def has_onnxruntime() -> bool:
    """onnxruntime (or onnxruntime-gpu) to run a graph and onnx to build it."""
    return all(importlib.util.find_spec(package) is not None for package in ("onnxruntime", "onnx"))


def pick_runtime(runtime: str) -> str:
    """ "onnxruntime" or "torch" for a `RUNTIMES` value ("auto": ONNX Runtime when installed)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r} for the face networks; valid: {', '.join(RUNTIMES)}")
    if runtime == "auto":
        return "onnxruntime" if has_onnxruntime() else "torch"
    return runtime


def onnxruntime_session(model: bytes) -> Callable[[np.ndarray], np.ndarray]:
    """A one-thread CPU session of a one-input, one-output ONNX graph, as a function of its input."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torch_session(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A torch.nn.Module in inference mode on one torch thread, as a function of a float32 array."""
    import torch

    module.eval()

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        with one_torch_thread():
            return module(torch.from_numpy(x)).numpy()

    return run


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch.set_num_threads(1) inside, the previous count restored after (not thread-safe, as FaceAnalyzer)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
