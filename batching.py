"""Batches that shrink when the GPU runs out of memory: the face models' and the captioner's one way to go on.

A batch that raises CUDA's out-of-memory error runs again in halves, down to one item, and the smaller size stays
for the batches after it (the next one would run out of memory too); the log says so once. Nothing is lost: every
item is run, in order. Any other error, or running out of memory on one item, is the caller's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
LOG = logging.getLogger(__name__)


def out_of_memory(error: BaseException) -> bool:
    """CUDA ran out of memory: torch's `OutOfMemoryError`, or ONNX Runtime's (and older torch's) error text."""
    try:
        import torch

        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # an ONNX Runtime-only environment
        pass
    return "out of memory" in str(error).lower()


class HalvingBatches:
    """`run` over items in batches of at most `size` (None: all the items of a call at once), halved on a CUDA
    out-of-memory error. One per model and worker: the size it shrank to is kept for its later calls.

    `what` names the items in the one warning ("photos", "captions")."""

    def __init__(self, size: int | None, what: str):
        if size is not None and size < 1:
            raise ValueError(f"batch size must be at least 1, got {size}")
        self.size, self.what = size, what
        self._said = False

    def __call__(self, run: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
        """`run(batch)` for consecutive batches of `items`, concatenated (one result per item, in order)."""
        results: list[R] = []
        start = 0
        while start < len(items):
            batch = items[start : start + (self.size or len(items))]
            try:
                results += run(batch)
            except Exception as error:
                if len(batch) == 1 or not out_of_memory(error):
                    raise
                self.size = len(batch) // 2
                if not self._said:
                    self._said = True
                    LOG.warning(
                        "the GPU ran out of memory on a batch of %d %s: going on in batches of %d",
                        len(batch),
                        self.what,
                        self.size,
                    )
                continue
            start += len(batch)
        return results
