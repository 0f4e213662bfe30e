"""The stage contract: one set of stage classes that every engine runs (`local` now, Ray Data next).

Modelled on NeMo Curator's `ProcessingStage` (a name, declared resources, `setup()` once per worker, a batch
function), with what curation adds: rejects with reasons, content-keyed result stores and fingerprints.

Tables
    A run is a chain of stage tables, one row per photo, keyed by `source_path`. Every table starts with
    `PHOTO_FIELDS` (source_path, identity, sha256, reason, detail); `reason` is null while the photo is still a
    candidate. Every stage table is stored sorted by (identity, source_path) (`ORDER`), so one identity's rows
    are contiguous and a per-identity step can stream over them.

What a stage receives and returns
    `process(batch)` receives candidate rows (reason null) of the previous stage's table, restricted to
    `input_columns`, as a `pyarrow.Table`, and returns exactly one row per input row, in the input's order,
    with schema `output_schema()`. A non-null `reason` rejects the row (say why in `detail`); the engine never
    drops or invents rows. The engine then appends the input's `carry_columns` that process() did not return,
    so the written table is `output_schema()` + carried fields. The optional boolean column `COMPUTED` says which rows' expensive work ran in
    this call (the rest came from a store); engines sum it into the run's stats and drop it before writing.

Kinds (`stage.kind`; an engine maps each to its own operator)
    MAP     row-independent: any batching gives the same rows (engines use `batch_size`). May run models
            (`uses_models`); the local engine runs it in a process pool, Ray as tasks (`map_batches`), or on
            an actor pool where it asks for a GPU and the cluster has GPUs.
    GROUP   one call per identity with all of that identity's candidate rows (sorted by source_path): the
            quadratic work of identify / near-duplicate dedupe / select stays inside one identity
            (local: streamed group by group; Ray: `groupby("identity").map_groups`).
    GLOBAL  one call with every candidate row, but only `input_columns`, which are small (hashes, paths,
            embeddings: never images or landmarks). It may change `identity` (clustering); the engine re-sorts.

Lifecycle and resources
    A stage object is built in the driver from a picklable `StageContext` and shipped to workers as is.
    `setup()` runs once per worker process (a pool's, Ray's, or a Ray actor) before its first batch: it builds
    the FaceAnalyzer (for the *resolved* backend in `context.backend`) and opens the stores. A setup that cannot succeed (a bad
    model folder) raises `StageSetupError` with one line saying what to fix; engines stop the run with it.
    `resources` (declared in `curation.chain`) asks for cpus, a GPU share (model stages: the Ray engine runs
    them on GPU actors where the cluster has GPUs, CPU steps as tasks without; none with `--device cpu`) and the
    batch size per worker. Setup that the workers share across stages (the face backend, resolved once per
    worker while the driver starts) goes through `Engine.prepare`.
    `finish()` runs once in the driver after the engine is done with the stage (the pipeline calls it).

Caching and resume
    Expensive per-photo results (detections, face descriptions, crops) live in content-keyed `ResultStore`s
    under the work folder: `process()` looks its keys up, computes only what is missing and appends it as a
    new part file before returning. Concurrent writers are safe (part names are unique), so a killed run loses
    at most the batches in flight, under either engine. Store keys are digests of the real inputs (file bytes,
    resolved backend and its model files, the inputs handed to the model), never of names or settings that
    could change under them. A stage's finished table carries `fingerprint(upstream)`: the digest of the
    stage name, its `version`, the values of its `settings`, the resolved backend (model stages) and the
    fingerprint of the table it read. An equal fingerprint means the table is current and the stage is skipped.

Engines
    An engine (`curation/engines/`) implements `Engine.run_stage(stage, source, target, fingerprint)`: read the
    candidate rows of the table at `source`, run `stage` according to its kind, write its output sorted by
    `ORDER` to `target` (Parquet, `fingerprint` in the schema metadata, `COMPUTED` dropped), and return the
    `StageStats`. The steps around the stages are shared by every engine and run in the driver: `scan` (walk
    and hash PHOTOS_DIR into the first table) and, after the `crop` stage, `write` (stream the kept rows and
    their crops into the dataset shards, rejects, identities, card, report).

The chain (declared in `curation.chain`; `pipeline.build_stages(context)` returns it in order; table =
<work>/<name>.parquet)
    scan (driver) -> detect MAP (models) -> describe MAP (models) -> identify GROUP (GLOBAL with --cluster)
    -> size MAP -> exact_dedupe GLOBAL -> dedupe GROUP -> align MAP (crop transforms and quality) -> label MAP
    -> select GROUP -> crop MAP (the kept faces' crops into the crop store) -> caption MAP (models, with
    --captioner: a caption per crop) -> write (driver)

Steps
    `step` is the user-facing stage the class belongs to (CLI command, rejects' `stage` column, summary
    stats): several classes may make up one step (`describe` + `identify` are the step `identify`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from dynamicid.curation.chain import Resources, entry_of
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.tables import digest

PHOTO_FIELDS: list[tuple[str, pa.DataType]] = [
    ("source_path", pa.string()),
    ("identity", pa.string()),
    ("sha256", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
]
ORDER: list[tuple[str, str]] = [("identity", "ascending"), ("source_path", "ascending")]
COMPUTED = "_computed"  # optional bool column of a stage's output: this row's expensive work ran in this call


class StageKind(enum.Enum):
    MAP = "map"
    GROUP = "group"
    GLOBAL = "global"


class StageSetupError(RuntimeError):
    """A worker could not set a stage up (models missing or broken): one line that says what to fix."""


@dataclass(frozen=True)
class BackendInfo:
    """The face backend as resolved once in the driver; workers build exactly this one."""

    name: str  # a name of `dynamicid.faces.backends.BACKENDS` (never "auto")
    root: str | None  # its model folder (insightface's pack), resolved to an absolute path
    digest: str  # of the backend name and its model files (names, sizes, mtimes): a changed model = new results
    embedding_model: str
    same_person_threshold: float  # in the backend's own distance (for messages)
    same_person_cos: float  # the backend's same-person threshold as a cosine similarity (unit embeddings)
    duplicate_cos: float  # near-duplicate threshold (dup_embedding_fraction of the same-person distance)
    device: str = "auto"  # as requested (auto, cpu, cuda): each worker process picks its own (not in `digest`)


@dataclass(frozen=True)
class StageContext:
    """Everything a stage needs on any worker (picklable; paths are absolute)."""

    photos_dir: Path
    work_dir: Path
    config: CurationConfig
    backend: BackendInfo


def photo_schema(*extra: tuple[str, pa.DataType] | pa.Field) -> pa.Schema:
    return pa.schema([*PHOTO_FIELDS, *extra])


class Stage:
    """Base class of every curation stage (see the module docstring for the contract)."""

    name: ClassVar[str]  # unique; also the work table's file name (<work>/<name>.parquet)
    kind: StageKind = StageKind.MAP  # an instance attribute may override it (identify: GROUP or GLOBAL)
    version: ClassVar[str] = "1"  # bump when the stage's output changes for the same inputs
    input_columns: ClassVar[tuple[str, ...]] = ("source_path", "identity", "sha256")
    # Columns of the input table that the engine copies into the output next to process()'s own columns
    # (process() never needs to see them; for GLOBAL stages this is how large columns skip the global step).
    carry_columns: ClassVar[tuple[str, ...]] = ()
    uses_models: ClassVar[bool] = False  # setup() builds a FaceAnalyzer: one per worker
    pooled: ClassVar[bool] = False  # worth worker processes (models, image decoding); else the driver runs it

    def __init__(self, context: StageContext):
        self.context = context
        self.config = context.config

    @property
    def step(self) -> str:
        """The user-facing step it belongs to (`curation.chain`)."""
        return entry_of(type(self))[0].name

    @property
    def settings(self) -> tuple[str, ...]:
        """The `CurationConfig` fields its output depends on (`curation.chain`): part of its fingerprint."""
        return entry_of(type(self))[1].settings

    @property
    def resources(self) -> Resources:
        """CPUs, GPU share and batch size per worker (`curation.chain`; the CPU defaults for a stage outside the
        chain): the engines schedule by them. With `--device cpu` no stage asks for a GPU (no worker holds one)."""
        try:
            declared = entry_of(type(self))[1].resources
        except LookupError:
            return Resources()
        return replace(declared, gpus=0.0) if self.config.device == "cpu" else declared

    @property
    def batch_size(self) -> int:
        """Rows per MAP batch (`resources`)."""
        return self.resources.batch_size

    def output_schema(self) -> pa.Schema:
        raise NotImplementedError

    def setup(self) -> None:
        """Once per worker before the first batch (models, stores)."""

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def finish(self) -> None:
        """Once in the driver after every batch ran, by the pipeline (no engine calls it): compact stores."""

    def fingerprint(self, upstream: str) -> str:
        values = asdict(self.config)
        chosen = json.dumps({k: values[k] for k in self.settings}, sort_keys=True)
        return digest(self.name, self.version, chosen, self.context.backend.digest, upstream)

    def source(self, relative: str) -> str:
        return str(self.context.photos_dir / relative)


@dataclass
class StageStats:
    """Per step, summed over its stages: what an engine returns from `run_stage`."""

    computed: int = 0  # rows whose expensive work ran in this call
    reused: int = 0  # rows whose result came from a store or an earlier run
    seconds: float = 0.0
    skipped: bool = False  # the table was current: nothing ran

    def account(self, table: pa.Table) -> pa.Table:
        """Count a stage's output batch (its `COMPUTED` flags, else every row) and return it without them."""
        if COMPUTED not in table.column_names:
            self.computed += table.num_rows
            return table
        done = pc.sum(table.column(COMPUTED)).as_py() or 0
        self.computed += done
        self.reused += table.num_rows - done
        return table.drop_columns([COMPUTED])
