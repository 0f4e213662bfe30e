"""Native log lines (MediaPipe's glog/absl, TFLite's XNNPACK notice) dropped at the file-descriptor level.

Those libraries write straight to file descriptor 2 from C++ threads, past Python's `sys.stderr` and the
GLOG_/TF_CPP_ environment variables, so fd 2 points at /dev/null while their models are built and run.
`--verbose` (`dynamicid.clitools.VERBOSE_ENV`) lets them through.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dynamicid.clitools import verbose

_lock = threading.Lock()
_depth = 0  # nested or concurrent users: fd 2 comes back when the last one leaves
_saved_fd = -1


@contextmanager
def quiet_native_logs() -> Iterator[None]:
    global _depth, _saved_fd
    if verbose():
        yield
        return
    with _lock:
        if _depth == 0:
            sys.stderr.flush()
            _saved_fd = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                os.dup2(_saved_fd, 2)
                os.close(_saved_fd)


class QuietGraph:
    """A MediaPipe solution graph whose `process` runs under `quiet_native_logs`."""

    def __init__(self, graph):
        self.graph = graph

    def process(self, image):
        with quiet_native_logs():
            return self.graph.process(image)

    def close(self) -> None:
        self.graph.close()
