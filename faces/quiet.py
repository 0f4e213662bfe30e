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
from types import SimpleNamespace

import numpy as np

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
    """A MediaPipe solution graph (`SolutionBase`) whose `process` runs under `quiet_native_logs`."""

    def __init__(self, graph):
        self.graph = graph

    def process(self, image: np.ndarray) -> SimpleNamespace:
        """`SolutionBase.process` of one RGB image, with the same outputs as attributes, minus the namedtuple class
        that it defines (with `eval`) for every call, several per photo. It drives the graph through the attributes
        that `process` uses in the pinned mediapipe 0.10.21 (tests/test_faces_embedded.py checks both give the same
        results)."""
        graph = self.graph
        ((stream, kind),) = graph._input_stream_type_info.items()
        graph._graph_outputs.clear()
        graph._simulated_timestamp += 33333  # as `process`: a 30 fps video
        # MediaPipe copies a writable array into its packet and wraps a read-only one: the graph only reads it.
        frame = np.ascontiguousarray(image).view()
        frame.flags.writeable = False
        packet = graph._make_packet(kind, frame).at(graph._simulated_timestamp)
        with quiet_native_logs():
            graph._graph.add_packet_to_input_stream(stream=stream, packet=packet)
            graph._graph.wait_until_idle()
        outputs = graph._graph_outputs
        return SimpleNamespace(
            **{
                name: graph._get_packet_content(kind, outputs[name]) if name in outputs else None
                for name, kind in graph._output_stream_type_info.items()
            }
        )

    def close(self) -> None:
        self.graph.close()
