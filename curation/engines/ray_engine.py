"""The Ray Data engine (`--engine ray`): the stage classes of `curation.stages` as Ray Data operators.

- MAP stages that are worth workers (`pooled`: the face models, image decoding) -> `map_batches` on an actor
  pool of `--workers` actors; each actor runs the stage's `setup()` once (one FaceAnalyzer per actor) and asks
  for the stage's CPUs and, when the cluster has GPUs, its GPU fraction.
- GROUP stages (identify, near-duplicate dedupe, select) -> `groupby("identity").map_groups` (Ray tasks, a
  sort-based shuffle: each task sets the stage up once and gets whole identities, in identity order).
- GLOBAL stages (exact-bytes dedupe, `--cluster`) and cheap MAP stages run in the driver exactly as the local
  engine runs them: one call on small columns is no work for a cluster.

The driver writes every output table itself, sorted by (identity, source_path), so the work tables and the
dataset equal the local engine's. Actors read the photos and write the result stores, so on a cluster
PHOTOS_DIR and the work folder must be at the same path on every node (a shared file system), and every node
needs this package installed (`pip install dynamicid[ray]`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import weakref
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from dynamicid.curation.engines import EngineUnavailable
from dynamicid.curation.engines.local import LocalEngine, count_candidates, output_layout, stage_output
from dynamicid.curation.stages import BackendInfo, Stage, StageKind, StageSetupError, StageStats
from dynamicid.curation.tables import TableWriter

LOCAL_OBJECT_STORE = 1 << 30  # bytes, for a Ray started here: blocks stream through it, spilling to disk if needed
_SET_UP: weakref.WeakSet[Stage] = weakref.WeakSet()  # GROUP stages set up in this worker process
_SETUP_LINE = re.compile(r"StageSetupError: (.+)")


class _StageActor:
    """One actor of a MAP stage's pool: the stage set up once (its models built once), then batches through it."""

    def __init__(self, stage: Stage, carried: list[str]):
        stage.setup()  # a StageSetupError here ends the run with its one line (see `run_stage`)
        self.stage, self.carried = stage, carried

    def __call__(self, batch: pa.Table) -> pa.Table:
        return stage_output(self.stage, batch.filter(pc.is_null(batch.column("reason"))), self.carried)


def _process_group(rows: pa.Table, stage: Stage, carried: list[str]) -> pa.Table:
    """One identity's candidate rows through a GROUP stage (in a Ray task, set up once per task)."""
    if stage not in _SET_UP:
        stage.setup()
        _SET_UP.add(stage)
    rows = rows.filter(pc.is_null(rows.column("reason"))).sort_by("source_path")
    return stage_output(stage, rows, carried)


class RayEngine:
    name = "ray"

    def __init__(self, *, workers: int, progress: bool, address: str | None = None):
        try:
            import ray.data  # noqa: F401
        except ImportError as error:
            raise EngineUnavailable(
                f"--engine ray needs Ray Data ({error}): pip install 'dynamicid[ray]' (or the pinned requirements/lock.txt)"
            ) from None
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
        context = DataContext.get_current()
        context.enable_progress_bars = self.progress
        context.execution_options.preserve_order = True  # outputs in input order: no sort needed
        context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED  # groupby by sorting: tasks, no actors

    def resolve_backend(self, requested: str, dup_embedding_fraction: float) -> BackendInfo:
        from dynamicid.curation.backend import resolve_backend

        return resolve_backend(requested, dup_embedding_fraction, keep=False)[0]  # the actors build their own

    def run_stage(self, stage: Stage, source: Path, target: Path, fingerprint: str) -> StageStats:
        if stage.kind is StageKind.GLOBAL or (stage.kind is StageKind.MAP and not stage.pooled):
            return self.driver.run_stage(stage, source, target, fingerprint)
        self._connect()
        start = time.perf_counter()
        schema, carried, columns = output_layout(stage, source)
        stats = StageStats()
        with TableWriter(target, schema, fingerprint) as writer:
            if count_candidates(source):
                try:
                    for block in self._dataset(stage, source, columns, carried).iter_batches(
                        batch_size=None, batch_format="pyarrow"
                    ):
                        writer.write(stats.account(block).select(schema.names).cast(schema))
                except Exception as error:  # Ray wraps a worker's error in its own: find the one line again
                    found = _SETUP_LINE.findall(str(error))
                    if not found:
                        raise
                    raise StageSetupError(found[-1].strip()) from None
        stats.seconds = time.perf_counter() - start
        return stats

    def _dataset(self, stage: Stage, source: Path, columns: list[str], carried: list[str]):
        import ray
        import ray.data
        from ray.data import ActorPoolStrategy

        data = ray.data.read_parquet(str(source)).select_columns(list(dict.fromkeys([*columns, "reason"])))
        if stage.kind is StageKind.GROUP:
            # A sort-based groupby: groups come out in identity order, so the table needs no further sort.
            return data.groupby("identity").map_groups(_process_group, fn_args=(stage, carried), batch_format="pyarrow")
        cluster = ray.cluster_resources()
        cpus, gpus = float(cluster.get("CPU", 1.0)), float(cluster.get("GPU", 0.0))
        wanted = stage.resources
        # Leave a CPU to Ray Data's own read and repartition tasks: actors holding every CPU would starve them.
        num_cpus = min(wanted.cpus, max(cpus - 1, cpus / 2) / self.workers)
        # Model stages share the cluster's GPUs (when it has any) in fractions, unless they ask for their own.
        num_gpus = (wanted.gpus or (min(1.0, gpus / self.workers) if stage.uses_models else 0.0)) if gpus else 0.0
        # Blocks of one batch each, so that every actor of the pool gets work.
        data = data.repartition(target_num_rows_per_block=stage.batch_size)
        return data.map_batches(
            _StageActor,
            fn_constructor_args=(stage, carried),
            compute=ActorPoolStrategy(size=self.workers),
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )

    def close(self) -> None:
        if self.connected:
            import ray

            ray.shutdown()  # stops a Ray this engine started; only disconnects from a cluster
            self.connected = False


def _check_reachable(address: str) -> None:
    """Raise ConnectionError when nothing listens at host:port (asked once, for at most 10 s)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():  # `auto`, `local`: Ray finds (or refuses) those at once
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ConnectionError(f"nothing answers at {host}:{port} ({error})") from None
