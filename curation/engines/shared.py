"""What every engine shares: the stages a worker process keeps set up, and the stage tables' candidate rows read in
batches, identity groups or whole, written in one output layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamicid.curation.allocator import keep_freed_buffers
from dynamicid.curation.stages import COMPUTED, Stage, StageSetupError
from dynamicid.curation.tables import STAGE_ROW_GROUP, contiguous_groups

READ_ROWS = STAGE_ROW_GROUP  # rows per record batch read from a stage table (one row group)

# A worker process (a local pool's, or a Ray worker running tasks) keeps every stage it has set up, keyed by
# stage name and fingerprint, and (through `analyzer_for`) the face models: one process serves all the steps of a
# run instead of importing and building models again per step.
_WORKER_STAGES: dict[str, Stage] = {}
_WORKER_ERRORS: dict[str, str] = {}


def worker_stage(key: str, stage: Stage) -> Stage:
    """This process's set-up copy of `stage` (set up on first use; a setup that failed fails again at once)."""
    if key not in _WORKER_STAGES and key not in _WORKER_ERRORS:
        if not _WORKER_STAGES and not _WORKER_ERRORS:  # this process's first stage
            _settle_worker_process()
        try:
            stage.setup()
            _WORKER_STAGES[key] = stage
        except StageSetupError as error:
            _WORKER_ERRORS[key] = str(error)
    if key in _WORKER_ERRORS:
        raise StageSetupError(_WORKER_ERRORS[key])
    return _WORKER_STAGES[key]


def _settle_worker_process() -> None:
    import cv2

    keep_freed_buffers()
    cv2.setNumThreads(1)  # the workers are the parallelism: OpenCV's own threads would only compete with them


def stage_key(stage: Stage, fingerprint: str) -> str:
    return f"{stage.name}:{fingerprint}"


def candidate_batches(
    source: Path, columns: list[str], size: int, *, only_candidates: bool = True
) -> Iterator[pa.Table]:
    """Candidate rows (reason null; every row if not `only_candidates`) of a stage table, in table order,
    `size` rows at a time."""
    file = pq.ParquetFile(source)
    wanted = list(dict.fromkeys([*columns, "reason"]))
    pending: list[pa.Table] = []
    count = 0
    for record in file.iter_batches(batch_size=READ_ROWS, columns=wanted):
        table = pa.Table.from_batches([record])
        if only_candidates:
            table = table.filter(pc.is_null(table.column("reason")))
        table = table.select(columns)
        while table.num_rows:
            take = min(size - count, table.num_rows)
            pending.append(table.slice(0, take))
            count += take
            table = table.slice(take)
            if count == size:
                yield pa.concat_tables(pending).combine_chunks()
                pending, count = [], 0
    if count:
        yield pa.concat_tables(pending).combine_chunks()


def identity_groups(source: Path, columns: list[str]) -> Iterator[pa.Table]:
    """All candidate rows of one identity at a time (tables are sorted by identity, so groups are contiguous)."""
    return contiguous_groups(candidate_batches(source, columns, READ_ROWS), "identity")


def read_candidates(source: Path, columns: list[str]) -> pa.Table:
    """Every candidate row of a stage table, only `columns` (for small columns: GLOBAL steps, write)."""
    tables = list(candidate_batches(source, columns, READ_ROWS))
    return pa.concat_tables(tables) if tables else pq.read_schema(source).empty_table().select(columns)


def output_layout(stage: Stage, source: Path) -> tuple[pa.Schema, list[str], list[str]]:
    """The written table's schema (the stage's own columns, then the carried ones), the carried columns, and
    the columns to read from `source` (every engine writes exactly this layout)."""
    own = [f for f in stage.output_schema() if f.name != COMPUTED]
    carried = [n for n in stage.carry_columns if n not in {f.name for f in own}]
    schema = pa.schema([*own, *(pq.read_schema(source).field(n) for n in carried)])
    return schema, carried, list(dict.fromkeys([*stage.input_columns, *carried]))


def stage_output(stage: Stage, batch: pa.Table, carried: list[str]) -> pa.Table:
    """`stage.process` on a batch of candidate rows (all the `output_layout` columns), plus the carried columns."""
    return with_carried(stage, batch, stage.process(batch.select(list(stage.input_columns))), carried)


def with_carried(stage: Stage, batch: pa.Table, out: pa.Table, carried: list[str]) -> pa.Table:
    if out.num_rows != batch.num_rows:
        raise RuntimeError(f"stage {stage.name} returned {out.num_rows} rows for {batch.num_rows}")
    for name in carried:
        out = out.append_column(batch.schema.field(name), batch.column(name))
    return out


def count_candidates(source: Path) -> int:
    """Rows still in the running: those without a reject reason."""
    return pq.read_table(source, columns=["reason"]).column("reason").null_count
