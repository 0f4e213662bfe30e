"""The local engine's worker pool: calls shipped to the workers, and each worker kept to a core of its own."""

import os
import time

import pytest

from dynamicid.curation.engines.local import LocalEngine, worker_cores
from dynamicid.curation.stages import StageSetupError

CORES = sorted(os.sched_getaffinity(0))


def pid_and_cores(seconds: float) -> tuple[int, set[int]]:
    """Run in a worker (spawned workers import this module): long enough that every worker gets calls."""
    time.sleep(seconds)
    return os.getpid(), os.sched_getaffinity(0)


def test_calls_run_in_the_workers_and_come_back_in_order():
    engine = LocalEngine(workers=2, progress=False)
    try:
        results = list(engine.map_calls(((divmod, (n, 7)) for n in range(50)), "dividing"))
        workers = {pid for pid, _ in engine.map_calls([(pid_and_cores, (0.2,))] * 8, "sleeping")}
    finally:
        engine.close()
    assert results == [divmod(n, 7) for n in range(50)]
    assert os.getpid() not in workers


def test_with_one_worker_the_calls_run_in_this_process():
    engine = LocalEngine(workers=1, progress=False)
    assert [pid for pid, _ in engine.map_calls([(pid_and_cores, (0,))] * 3, "sleeping")] == [os.getpid()] * 3
    assert engine._pool is None


def test_a_worker_that_dies_in_a_call_stops_the_run_with_what_it_was_doing():
    engine = LocalEngine(workers=2, progress=False)
    with pytest.raises(StageSetupError, match="writing the dataset's shards"):
        list(engine.map_calls([(os._exit, (3,))], "writing the dataset's shards"))
    assert engine._pool is None  # closed: the next call starts a fresh pool


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores")
def test_workers_that_fill_the_cores_keep_to_one_core_each():
    assert worker_cores(len(CORES)) == CORES
    assert worker_cores(len(CORES) - 1) == [] and worker_cores(len(CORES) + 1) == []
    engine = LocalEngine(workers=len(CORES), progress=False)
    try:
        seen = dict(engine.map_calls([(pid_and_cores, (0.3,))] * (4 * len(CORES)), "sleeping"))
    finally:
        engine.close()
    assert len(seen) == len(CORES)  # every worker ran calls
    assert all(len(cores) == 1 for cores in seen.values())
    assert sorted(core for cores in seen.values() for core in cores) == CORES


@pytest.mark.skipif(len(CORES) < 3, reason="needs three cores")
def test_fewer_workers_than_cores_are_placed_by_the_system():
    engine = LocalEngine(workers=2, progress=False)
    try:
        seen = dict(engine.map_calls([(pid_and_cores, (0.3,))] * 8, "sleeping"))
    finally:
        engine.close()
    assert all(sorted(cores) == CORES for cores in seen.values())
