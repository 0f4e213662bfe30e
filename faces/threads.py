"""The face networks run on one thread, in ONNX Runtime when it is installed (the lock installs it), else PyTorch,
on the CPU or, with `device="cuda"`, on a CUDA GPU (ONNX Runtime's CUDAExecutionProvider, or torch's "cuda").

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

from dynamicid.faces.backends import DEVICES

RUNTIMES = ("auto", "onnxruntime", "torch")
CUDA_PROVIDER = "CUDAExecutionProvider"


def onnxruntime_cuda() -> bool:
    """Whether ONNX Runtime here has its CUDA provider (onnxruntime-gpu; the lock's onnxruntime is CPU-only)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return CUDA_PROVIDER in onnxruntime.get_available_providers()


def cuda_available(*, onnxruntime_only: bool = False) -> bool:
    """Whether the face networks can run on CUDA here: onnxruntime-gpu's CUDA provider, or (unless
    `onnxruntime_only`: networks that only ONNX Runtime runs) torch with CUDA."""
    if onnxruntime_cuda():
        return True
    if onnxruntime_only or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pick_device(device: str, *, onnxruntime_only: bool = False) -> str:
    """ "cpu" or "cuda" for a `DEVICES` value; "cuda" where CUDA is not usable is a ValueError (one line).
    `onnxruntime_only`: for networks that only ONNX Runtime runs (insightface's), CUDA means onnxruntime-gpu."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} for the face networks; valid: {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    usable = cuda_available(onnxruntime_only=onnxruntime_only)
    if device == "cuda" and not usable and onnxruntime_only:
        raise ValueError(
            f"device 'cuda' was asked for but ONNX Runtime here has no {CUDA_PROVIDER}, so no CUDA GPU for the "
            "insightface models: install onnxruntime-gpu in place of onnxruntime on a GPU machine, or use device 'cpu'"
        )
    if device == "cuda" and not usable:
        raise ValueError(
            "device 'cuda' was asked for but this process sees no CUDA GPU (neither onnxruntime-gpu's "
            f"{CUDA_PROVIDER} nor torch.cuda): install onnxruntime-gpu on a GPU machine, or use device 'cpu'"
        )
    return "cuda" if usable else "cpu"


def onnxruntime_providers(device: str) -> list[str]:
    """ONNX Runtime providers for a picked device: CUDA first (CPU for the ops it lacks), else the CPU only."""
    return [CUDA_PROVIDER, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def has_onnxruntime() -> bool:
    """onnxruntime (or onnxruntime-gpu) to run a graph and onnx to build it."""
    return all(importlib.util.find_spec(package) is not None for package in ("onnxruntime", "onnx"))


def pick_runtime(runtime: str, device: str = "cpu") -> str:
    """ "onnxruntime" or "torch" for a `RUNTIMES` value ("auto": ONNX Runtime when installed, and on a picked
    device "cuda" only when it has CUDA: a CPU-only onnxruntime would quietly run on the CPU, so torch's CUDA then)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r} for the face networks; valid: {', '.join(RUNTIMES)}")
    if runtime == "auto":
        usable = has_onnxruntime() and (device != "cuda" or onnxruntime_cuda())
        return "onnxruntime" if usable else "torch"
    return runtime


def onnxruntime_session(model: bytes, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A one-thread session (CPU, or CUDA for device "cuda") of a one-input, one-output ONNX graph, as a function
    of its input."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(model, options, providers=onnxruntime_providers(device))
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torch_session(module: Any, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A torch.nn.Module in inference mode (on one torch thread, or on CUDA for device "cuda"), as a function of
    a float32 array."""
    import torch

    module.eval().to(device)

    @torch.inference_mode()
    def run(x: np.ndarray) -> np.ndarray:
        with one_torch_thread():
            return module(torch.from_numpy(x).to(device)).cpu().numpy()

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
