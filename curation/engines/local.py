"""The local engine: this process plus a pool of worker processes, streaming Parquet record batches.

Memory is bounded whatever the photo count: a MAP stage holds a few batches (at most two per worker in
flight), a GROUP stage one identity's rows, a GLOBAL stage only its small input columns. Results are written
in the input's order, so any number of workers gives the same table.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from dynamicid.clitools import progress_options
from dynamicid.curation.chain import Resources
from dynamicid.curation.engines import Call, Pending
from dynamicid.curation.engines.shared import (
    READ_ROWS,
    candidate_batches,
    count_candidates,
    identity_groups,
    output_layout,
    read_candidates,
    stage_key,
    stage_output,
    with_carried,
    worker_stage,
)
from dynamicid.curation.stages import ORDER, Stage, StageKind, StageSetupError, StageStats
from dynamicid.curation.tables import TableWriter

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_cores(workers: int) -> list[int]:
    """The core each worker keeps to, when `workers` processes fill every core this process may run on; else none.

    With each worker on a core of its own, `--workers 2` builds on 2 cores took 4-10 % less wall time (BENCHMARKS.md):
    the workers' model threads stay on their worker's core and its caches. Batches go to whichever worker is free,
    so a core slowed by other work only gives its worker fewer batches. With fewer workers than cores the system
    places them.
    """
    if not hasattr(os, "sched_getaffinity"):  # Linux only
        return []
    cores = sorted(os.sched_getaffinity(0))
    return cores if workers > 1 and len(cores) == workers else []


def _start_worker(driver: int, cores: multiprocessing.queues.Queue | None) -> None:
    """Pool initializer: the worker ends with its driver, and keeps to a core when given one."""
    _end_with_driver(driver)
    _keep_to_a_core(cores)


def _end_with_driver(driver: int) -> None:
    """Have the kernel kill this worker when the driver process `driver` dies, however it dies (SIGKILL, OOM): a
    pool process otherwise lives on, holding its face models (about 0.45 GB), waiting for work forever."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        with contextlib.suppress(AttributeError):  # a libc without prctl: the driver's shutdown still ends us
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != driver:  # the driver died before the line above took effect
        os._exit(1)


def _keep_to_a_core(cores: multiprocessing.queues.Queue | None) -> None:
    """This worker (every thread it has, and the model threads it starts later) on one core."""
    if cores is None:
        return
    core = cores.get()
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that has ended, a sandbox that forbids it: run unpinned
            os.sched_setaffinity(int(thread), {core})


def _process_in_worker(key: str, stage: Stage, batch: pa.Table) -> pa.Table:
    return worker_stage(key, stage).process(batch)


class LocalEngine:
    name = "local"

    def __init__(self, *, workers: int, progress: bool):
        self.workers = workers
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None  # started by the first prepare or stage, kept until close()

    def _worker_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            cores = None
            if chosen := worker_cores(self.workers):
                cores = context.Queue()
                for core in chosen:
                    cores.put(core)
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), cores)
            )
        return self._pool

    def prepare(self, call: Call, resources: Resources) -> Pending:
        """With workers, `call` in each of them at once (the pool starts here: what the driver does until it waits
        overlaps their imports and setup); with one, in this process when waited for. Every MAP stage worth
        workers runs in the same pool, whatever its `resources`."""
        function, arguments = call
        if self.workers <= 1:
            return lambda: [function(*arguments)]
        pool = self._worker_pool()
        futures = [pool.submit(function, *arguments) for _ in range(self.workers)]

        def results() -> list[Any]:
            try:
                return [future.result() for future in futures]
            except BrokenProcessPool as error:
                self.close()
                raise StageSetupError(f"a worker process died while setting up ({error})") from error

        return results

    def run_stage(self, stage: Stage, source: Path, target: Path, fingerprint: str) -> StageStats:
        start = time.perf_counter()
        stats = StageStats()
        schema, carried, columns = output_layout(stage, source)
        total = count_candidates(source)
        bar = tqdm(
            total=total,
            desc=stage.name,
            unit="photo",
            disable=not self.progress or not total,
            leave=False,
            **progress_options(),
        )
        try:
            with TableWriter(target, schema, fingerprint) as writer:
                if stage.kind is StageKind.GLOBAL:
                    outputs = self._run_global(stage, source, carried)
                elif stage.kind is StageKind.GROUP:
                    stage.setup()
                    outputs = (stage_output(stage, group, carried) for group in identity_groups(source, columns))
                else:
                    batches = candidate_batches(source, columns, stage.batch_size)
                    outputs = self._run_map(stage, stage_key(stage, fingerprint), batches, carried)
                for table in outputs:
                    writer.write(stats.account(table).select(schema.names).cast(schema))
                    bar.update(table.num_rows)
        finally:
            bar.close()
        stats.seconds = time.perf_counter() - start
        return stats

    def _run_global(self, stage: Stage, source: Path, carried: list[str]) -> Iterator[pa.Table]:
        """All candidates' input columns at once; carried columns joined back by position, streamed."""
        stage.setup()
        inputs = read_candidates(source, list(stage.input_columns))
        out = stage.process(inputs)
        same = out.num_rows == 0 or pc.all(pc.equal(out.column("identity"), inputs.column("identity"))).as_py()
        if not same:  # identities changed (clustering): re-sort; only small columns may be carried through
            if carried:
                out = with_carried(stage, read_candidates(source, carried), out, carried)
            yield out.sort_by(ORDER)
            return
        if not carried:
            yield out
            return
        offset = 0  # the output is in table order: join the carried columns batch by batch
        for batch in candidate_batches(source, carried, READ_ROWS):
            yield with_carried(stage, batch, out.slice(offset, batch.num_rows), carried)
            offset += batch.num_rows

    def _run_map(self, stage: Stage, key: str, batches: Iterator[pa.Table], carried: list[str]) -> Iterator[pa.Table]:
        inputs = list(stage.input_columns)
        if self.workers <= 1 or not stage.pooled:
            stage.setup()
            for batch in batches:
                yield stage_output(stage, batch, carried)
            return
        calls = ((_process_in_worker, (key, stage, batch.select(inputs)), batch) for batch in batches)
        for result, batch in self._in_pool(calls, f"stage {stage.name}"):
            yield with_carried(stage, batch, result, carried)

    def map_calls(self, calls: Iterable[Call], what: str) -> Iterator[Any]:
        """`function(*arguments)` of each call in the worker processes (in this process with one worker); the
        results in call order. At most two calls per worker are in flight, so `calls` may be made as they go."""
        if self.workers <= 1:
            for function, arguments in calls:
                yield function(*arguments)
            return
        for result, _ in self._in_pool(((function, arguments, None) for function, arguments in calls), what):
            yield result

    def _in_pool(self, calls: Iterable[tuple[Callable, tuple, T]], what: str) -> Iterator[tuple[Any, T]]:
        """(result, tag) of each (function, arguments, tag), run in the pool, in order."""
        pool = self._worker_pool()
        in_flight: list[tuple[Future, T]] = []
        try:
            for function, arguments, tag in calls:
                in_flight.append((pool.submit(function, *arguments), tag))
                if len(in_flight) >= 2 * self.workers:
                    future, done = in_flight.pop(0)
                    yield future.result(), done
            while in_flight:
                future, done = in_flight.pop(0)
                yield future.result(), done
        except BrokenProcessPool as error:
            self.close()
            raise StageSetupError(
                f"a worker process running {what} died ({error}); rerun with --workers 1 to see why"
            ) from error
        finally:
            for future, _ in in_flight:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
