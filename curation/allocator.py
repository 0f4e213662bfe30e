"""When glibc's malloc gives freed memory back to the system, in curation's processes.

A photo's decode, its warps and its crop's PNG allocate and free buffers of one to tens of MB per face. Left to
itself, glibc sizes its mmap and trim thresholds from the blocks freed so far, so a process's history decides
whether the next photo's buffers come from the heap or from fresh pages: in Ray's worker processes the heap was
trimmed and refilled batch after batch (4.1 million page faults, 10.8 s of system time for `align` on 1,173
faces, against 0.7 s in a local pool worker). Workers therefore fix both thresholds; the driver returns large
buffers around `write`, where holding them would grow with the dataset.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
LARGEST_HEAP_BLOCK = 32 * 1024 * 1024  # glibc's upper bound for its own mmap threshold adjustment
HEAP_KEPT_FREE = 64 * 1024 * 1024  # free bytes at the heap's top before it is trimmed (glibc would pick 2x the above)


def _mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): nothing to set
        return ctypes.CDLL("libc.so.6").mallopt
    return None


def keep_freed_buffers() -> None:
    """Large buffers freed by one photo serve the next from the heap (in worker processes, once)."""
    if (mallopt := _mallopt()) is not None:
        mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)
        mallopt(M_TRIM_THRESHOLD, HEAP_KEPT_FREE)


@contextlib.contextmanager
def large_buffers_given_back() -> Iterator[None]:
    """Inside, every freed buffer above 128 KiB goes back to the system (around `write`).

    glibc's malloc raises its mmap threshold to the size of each large block freed, after which crop-sized
    buffers come from the heap, whose free fragments piled up to 250 MB while `write` read 1,130 crops; a fixed
    threshold (glibc's default, 128 KiB) keeps each in its own mapping, unmapped when freed. Only around `write`:
    the model steps (in this process with `--workers 1`) decode photos into such buffers, and mapping each afresh
    cost them 11 CPU-seconds of page faults on 205 photos. Afterwards the threshold is glibc's upper bound
    (32 MiB), where its own adjustment would have taken it.
    """
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)
