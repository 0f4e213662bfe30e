"""The face networks run on one torch thread, whatever the process's setting.

float32 convolutions in oneDNN sum in an order that depends on the thread count (measured on the dlib ResNet:
1 vs 2 threads differ by about 1e-6 at most batch sizes), so on one thread an embedding or an expression score does
not depend on `torch.set_num_threads`, and curation rows stay identical across `--workers` and core counts. It
also costs nothing in throughput: these networks are small, and curation's workers are the parallelism.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch.set_num_threads(1) inside, the previous count restored after (not thread-safe, as FaceAnalyzer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
