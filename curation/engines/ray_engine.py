"""The Ray Data engine (`--engine ray`): the stage classes of `curation.stages` as Ray Data operators.

- MAP stages that are worth workers (`pooled`: the face models, image decoding) -> `map_batches` as Ray tasks,
  at most `--workers` at a time, each asking for the stage's CPUs. A worker process sets a stage up once
  (`setup()`, the FaceAnalyzer) and keeps it and its models for the whole run, as a local pool worker does: Ray
  reuses its worker processes for tasks, so detect, describe, align and crop share the models and imports of a
  process, where an actor pool per step started processes and built models again at every step (30 s of fixed
  cost on 2 CPUs).
- On a cluster with GPUs, the MAP stages whose `resources` ask for a GPU (the model steps) -> `map_batches` on an
  actor pool instead (`StageActor`, up to `--workers` actors, each with its GPU share: the cluster's GPUs over
  the workers, at most one), as NeMo Curator maps stages with GPUs to actors: each actor sets the stage up once
  and the blocks stream through it; the CPU steps stay tasks without GPUs. Without GPUs nothing changes.
- GROUP stages (identify, near-duplicate dedupe, select) -> `groupby("identity").map_groups` (Ray tasks, a
  sort-based shuffle: each task gets whole identities, in identity order).
- GLOBAL stages (exact-bytes dedupe, `--cluster`) and cheap MAP stages run in the driver exactly as the local
  engine runs them: one call on small columns is no work for a cluster.

Inputs are read by read tasks that each know their rows (`CandidateRows`). The driver writes every output table
itself, sorted by (identity, source_path), so the work tables and the dataset equal the local engine's. Tasks
read the photos and the work tables and write the result stores, so on a cluster PHOTOS_DIR and the work folder
must be at the same path on every node (a shared file system), and every node needs this package installed
(`pip install dynamicid[ray]`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamicid.curation.chain import Resources
from dynamicid.curation.engines import Call, EngineUnavailable, Pending

try:
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata
except ImportError as missing:
    raise EngineUnavailable(
        f"--engine ray needs Ray Data ({missing}): pip install 'dynamicid[ray]' (or the pinned requirements/lock.txt)"
    ) from None
from dynamicid.curation.engines.local import LocalEngine
from dynamicid.curation.engines.shared import (
    count_candidates,
    output_layout,
    stage_key,
    stage_output,
    worker_stage,
)
from dynamicid.curation.stages import Stage, StageKind, StageSetupError, StageStats
from dynamicid.curation.tables import TableWriter

LOCAL_OBJECT_STORE = 1 << 30  # bytes, for a Ray started here: blocks stream through it, spilling to disk if needed
GROUP_READ_ROWS = 4096  # candidate rows per read task of a per-identity step (small columns; the sort splits them)
_SETUP_LINE = re.compile(r"StageSetupError: (.+)")
_MAP_OPERATOR_LOG = "ray.data._internal.execution.operators.map_operator"


def _declared_resources(record: logging.LogRecord) -> bool:
    """Ray Data warns, twice per GPU step, that asking for CPUs and GPUs together is experimental: both are asked
    for on purpose (a worker's CPU share: Ray's default of one CPU per GPU actor may not fit `--workers` actors)."""
    return "num_cpus and num_gpus" not in record.getMessage()


def _process_block(block: pa.Table, key: str, stage: Stage, carried: list[str]) -> Iterator[pa.Table]:
    """A MAP stage on one block, `stage.batch_size` rows at a time (a Ray task; the worker process sets the stage
    up once for the whole run). Batched here, not by `map_batches`: Ray fuses a read only into a map without
    a batch size."""
    stage = worker_stage(key, stage)
    for start in range(0, block.num_rows, stage.batch_size):
        yield stage_output(stage, block.slice(start, stage.batch_size), carried)


class StageActor:
    """A MAP stage on an actor of Ray Data's pool (a GPU share each), set up once (at its first batch, so that a
    setup error stops the run in one line as a task's does); the batches stream through it."""

    def __init__(self, key: str, stage: Stage, carried: list[str]):
        self.key, self.stage, self.carried = key, stage, carried

    def __call__(self, batch: pa.Table) -> pa.Table:
        return stage_output(worker_stage(self.key, self.stage), batch, self.carried)


def _process_group(rows: pa.Table, key: str, stage: Stage, carried: list[str]) -> pa.Table:
    """One identity's candidate rows through a GROUP stage (a Ray task; set up once per worker process)."""
    return stage_output(worker_stage(key, stage), rows.sort_by("source_path"), carried)


def _read_rows(source: Path, columns: list[str], start: int, stop: int) -> list[pa.Table]:
    """The candidate rows among rows [start, stop) of a stage table (only the row groups that hold them)."""
    file = pq.ParquetFile(source)
    groups, first, offset = [], None, 0
    for index in range(file.metadata.num_row_groups):
        size = file.metadata.row_group(index).num_rows
        if offset < stop and offset + size > start:
            groups.append(index)
            first = offset if first is None else first
        offset += size
    rows = file.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
    return [rows.filter(pc.is_null(rows.column("reason")))]


class CandidateRows(Datasource):
    """A stage table's candidate rows as read tasks of about `rows` candidates each, in table order.

    Ray's `read_parquet` reads footers in actors of their own and makes one block per file, which then needs a
    repartition (a task per block) before the map: about 2 s per step. These read tasks know their rows up front
    (from the `reason` column, read once here), so Ray fuses each into the map task that processes its rows.
    """

    def __init__(self, source: Path, columns: list[str], rows: int):
        self.source, self.columns = source, columns
        candidates = pc.indices_nonzero(pc.is_null(pq.read_table(source, columns=["reason"]).column("reason")))
        positions = candidates.to_numpy()
        self.ranges = [(int(chunk[0]), int(chunk[-1]) + 1) for chunk in _chunks(positions, rows)]

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list:
        return [
            ReadTask(
                functools.partial(_read_rows, self.source, self.columns, start, stop),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(str(self.source),)),
            )
            for start, stop in self.ranges
        ]


def _read(rows: CandidateRows, **options):
    """One block per read task: without `override_num_blocks` Ray splits small reads into 200 blocks of a row or
    two (its default parallelism), and the sort behind `groupby` then runs 200 map and reduce tasks (35 s)."""
    import ray.data

    return ray.data.read_datasource(rows, override_num_blocks=len(rows.ranges), **options)


def _chunks(positions, size: int) -> list:
    return [positions[i : i + size] for i in range(0, len(positions), size)]


class RayEngine:
    name = "ray"

    def __init__(self, *, workers: int, progress: bool, address: str | None = None):
        self.workers = workers
        self.progress = progress
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:  # before anything is written: Ray itself retries a dead address for minutes
            try:
                _check_reachable(self.address)
            except ConnectionError as error:
                raise EngineUnavailable(
                    f"--ray-address / $RAY_ADDRESS {self.address}: {error}; start the cluster with `ray start --head` "
                    "or leave both unset for a local Ray"
                ) from None
        self.connected = False  # this engine started or joined Ray (and leaves it on close)
        self.driver = LocalEngine(workers=1, progress=progress)

    def _connect(self) -> None:
        """Join the running Ray (this process's, or the cluster at --ray-address / $RAY_ADDRESS), else start one."""
        import ray
        from ray.data import DataContext
        from ray.data.context import ShuffleStrategy

        if not ray.is_initialized():
            quiet = {"logging_level": logging.WARNING, "log_to_driver": self.progress}
            try:
                if self.address:
                    ray.init(address=self.address, **quiet)
                else:
                    ray.init(address="local", object_store_memory=LOCAL_OBJECT_STORE, include_dashboard=False, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                raise StageSetupError(
                    f"--engine ray could not start or join {where}: {error} "
                    "(start one with `ray start --head`, or leave --ray-address and $RAY_ADDRESS unset)"
                ) from None
            self.connected = True
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no execution plans on the user's terminal
        logging.getLogger(_MAP_OPERATOR_LOG).addFilter(_declared_resources)
        context = DataContext.get_current()
        context.enable_progress_bars = self.progress
        context.execution_options.preserve_order = True  # outputs in input order: no sort needed
        context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # groupby by sorting: tasks, no actors

    def prepare(self, call: Call, resources: Resources) -> Pending:
        """`call` in `--workers` Ray tasks at once, each in its own worker process with the resources of a stage
        asking for `resources`. Where those stages run as tasks, each process keeps what the call set up for
        them (as a local pool worker does; the driver sets up nothing); where they run on actors (GPUs), which
        set themselves up, the processes end after the call, giving back the GPU memory it took. Ray starts (or
        is joined) when the results are waited for: starting it takes seconds, which must not come before the
        run's input checks."""

        def results() -> list[Any]:
            import ray

            self._connect()
            cpus, gpus = self._worker_resources(resources)
            # On GPUs the stages run on actors; else max_calls=0: the process lives on with what it set up.
            remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1 if gpus else 0)(call[0])
            with _one_line_errors():
                return ray.get([remote.remote(*call[1]) for _ in range(self.workers)])

        return results

    def map_calls(self, calls: Iterable[Call], what: str) -> Iterator[Any]:
        """In the driver: the calls write OUT_DIR (the dataset's shards), which, unlike the work folder, need not
        be on a file system the cluster's nodes share."""
        return self.driver.map_calls(calls, what)

    def run_stage(self, stage: Stage, source: Path, target: Path, fingerprint: str) -> StageStats:
        if stage.kind is StageKind.GLOBAL or (stage.kind is StageKind.MAP and not stage.pooled):
            return self.driver.run_stage(stage, source, target, fingerprint)
        self._connect()
        start = time.perf_counter()
        schema, carried, columns = output_layout(stage, source)
        stats = StageStats()
        with TableWriter(target, schema, fingerprint) as writer:
            if count_candidates(source):
                with _one_line_errors():
                    data = self._dataset(stage, stage_key(stage, fingerprint), source, columns, carried)
                    for block in data.iter_batches(batch_size=None, batch_format="pyarrow"):
                        writer.write(stats.account(block).select(schema.names).cast(schema))
        stats.seconds = time.perf_counter() - start
        return stats

    def _dataset(self, stage: Stage, key: str, source: Path, columns: list[str], carried: list[str]):
        from ray.data import ActorPoolStrategy, TaskPoolStrategy

        num_cpus, num_gpus = self.task_resources(stage)
        wanted_columns = list(dict.fromkeys([*columns, "reason"]))
        if stage.kind is StageKind.GROUP:
            data = _read(CandidateRows(source, wanted_columns, GROUP_READ_ROWS), num_cpus=num_cpus)
            # A sort-based groupby: groups come out in identity order, so the table needs no further sort.
            return data.groupby("identity").map_groups(
                _process_group, fn_args=(key, stage, carried), batch_format="pyarrow"
            )
        # A task per block: about 4 blocks per worker keeps every worker busy to the end, and blocks of up to
        # 16 batches spread Ray's cost per task, about 0.3 s between one task's end and the next one's start on 2
        # CPUs: at 2,040 photos, blocks of 2, 8 and 16 batches gave 65, 59 and 50 s for detect (local: 46 s).
        rows = min(16 * stage.batch_size, max(stage.batch_size, -(-count_candidates(source) // (4 * self.workers))))
        blocks = CandidateRows(source, wanted_columns, rows)
        size = min(self.workers, len(blocks.ranges))
        resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if num_gpus:  # a model step on a cluster with GPUs: an actor pool of `size` actors, one GPU share each
            # Ray batches for GPU actors itself (it asks for a batch size), and then no longer fuses the read into
            # the map: the read tasks ask for no CPU, so that they never wait for the CPUs the actors hold.
            return _read(blocks, num_cpus=0).map_batches(
                StageActor,
                fn_constructor_args=(key, stage, carried),
                compute=ActorPoolStrategy(size=size),
                batch_size=stage.batch_size,
                batch_format="pyarrow",
                **resources,
            )
        # The same strategy and resources for the read and the map: Ray then fuses them, so a task reads its own
        # rows (a separate read task would wait for a CPU that the map tasks hold). max_calls=0: a worker process
        # keeps its models for the whole run.
        task = {"compute": TaskPoolStrategy(size=size), "max_calls": 0, **resources}
        return _read(blocks, **task).map_batches(
            _process_block, fn_args=(key, stage, carried), batch_size=None, batch_format="pyarrow", **task
        )

    def task_resources(self, stage: Stage) -> tuple[float, float]:
        """(num_cpus, num_gpus) of a stage's tasks or actors: its declared `resources`, within each worker's share
        of the cluster (a GPU share only where the cluster has GPUs and the stage asks for one)."""
        return self._worker_resources(stage.resources)

    def _worker_resources(self, wanted: Resources) -> tuple[float, float]:
        return min(wanted.cpus, self._cpus_per_worker()), min(wanted.gpus, self._gpus_per_worker())

    def _gpus_per_worker(self) -> float:
        """The cluster's GPUs shared out over the workers (at most one each); 0 on a cluster without GPUs."""
        import ray

        return min(1.0, float(ray.cluster_resources().get("GPU", 0.0)) / self.workers)

    def _cpus_per_worker(self) -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1.0)) / self.workers

    def close(self) -> None:
        if self.connected:
            import ray

            ray.shutdown()  # stops a Ray this engine started; only disconnects from a cluster
            self.connected = False


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A worker's StageSetupError reaches the driver wrapped in Ray's own error: raise its one line again."""
    try:
        yield
    except Exception as error:
        found = _SETUP_LINE.findall(str(error))
        if not found:
            raise
        raise StageSetupError(found[-1].strip()) from None


def _check_reachable(address: str) -> None:
    """Raise ConnectionError when nothing listens at host:port (asked once, for at most 10 s)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():  # `auto`, `local`: Ray finds (or refuses) those at once
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {host}:{port} ({error})") from None
