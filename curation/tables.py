"""The work folder: one Parquet table per stage, plus content-keyed result stores (`store.py`) under `stores/`.

A stage's finished table `<work>/<stage>.parquet` is streamed in record batches (`TableWriter`) and appears
atomically with a fingerprint of its inputs in the Parquet metadata; when the fingerprint of the next run
matches, the stage is skipped entirely.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FINGERPRINT_KEY = b"dynamicid_fingerprint"


def _leaf_columns(fields: Iterable[pa.Field], prefix: str = "") -> Iterator[tuple[str, pa.DataType]]:
    """(Parquet column path, type) of every leaf column, e.g. `image.bytes`, `landmarks.list.element.list.element`."""
    for field in fields:
        path, kind = prefix + field.name, field.type
        if pa.types.is_struct(kind):
            yield from _leaf_columns((kind.field(i) for i in range(kind.num_fields)), path + ".")
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            yield from _leaf_columns([kind.value_field.with_name("element")], path + ".list.")
        else:
            yield path, kind


def parquet_options(schema: pa.Schema, compression: str = "snappy", **options: Any) -> dict[str, Any]:
    """Writer options for `schema`: binary columns hold encoded images (PNG, JPEG), which neither compress nor
    repeat, so they are stored as they are, without the dictionary and the statistics that Parquet would first
    build over them (writing the dataset's shards took half the time; the files are 0.05 % larger)."""
    columns = list(_leaf_columns(schema))
    encoded = {path for path, kind in columns if pa.types.is_binary(kind) or pa.types.is_large_binary(kind)}
    if not encoded:
        return {"compression": compression, **options}
    others = [path for path, _ in columns if path not in encoded]
    return {
        "compression": {path: "none" if path in encoded else compression for path, _ in columns},
        "use_dictionary": others,
        "write_statistics": others,
        **options,
    }


def write_parquet(table: pa.Table, path: Path, *, fingerprint: str | None = None, **options: Any) -> None:
    """Write atomically (temp file + rename): a reader never sees half a table, even after a SIGKILL.
    `options`: `parquet_options`' keywords and further `pq.write_table` ones."""
    if fingerprint is not None:
        metadata = dict(table.schema.metadata or {})
        metadata[FINGERPRINT_KEY] = fingerprint.encode()
        table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, **parquet_options(table.schema, **options))
    os.replace(tmp, path)


# Rows per row group of a stage table. A reader or writer holds about one row group (a label row with its 478
# landmarks is ~6 KB: ~1.5 MB a group), so it is small enough that the buffers stop growing well below the
# benchmarks' smallest photo folder, and large enough that a footer (read whole by every reader) stays at tens
# of MB for a million rows.
STAGE_ROW_GROUP = 256


class TableWriter:
    """Streams tables into one Parquet file in row groups of `row_group_rows`; the file appears (atomically,
    with its fingerprint) on a clean exit. `options`: as `write_parquet`'s."""

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        fingerprint: str | None = None,
        *,
        row_group_rows: int = STAGE_ROW_GROUP,
        **options: Any,
    ):
        metadata = dict(schema.metadata or {})
        if fingerprint is not None:
            metadata[FINGERPRINT_KEY] = fingerprint.encode()
        self.schema = schema.with_metadata(metadata)
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.row_group_rows = row_group_rows
        self.options = parquet_options(self.schema, **options)
        self.rows = 0  # written or pending
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> TableWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, self.schema, **self.options)
        return self

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table.replace_schema_metadata(self.schema.metadata))
            self._pending_rows += table.num_rows
            self.rows += table.num_rows
            if self._pending_rows >= self.row_group_rows:
                self._flush(whole_groups_only=True)

    def _flush(self, *, whole_groups_only: bool = False) -> None:
        """Write the pending rows in row groups of `row_group_rows` (keep a last partial one pending, if asked)."""
        if not self._pending_rows:
            return
        assert self._writer is not None
        table = pa.concat_tables(self._pending)
        count = table.num_rows - table.num_rows % self.row_group_rows if whole_groups_only else table.num_rows
        self._writer.write_table(table.slice(0, count), row_group_size=self.row_group_rows)
        rest = table.slice(count)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def __exit__(self, kind: object, *exc: object) -> None:
        assert self._writer is not None
        if kind is None:
            self._flush()
        self._writer.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def read_fingerprint(path: Path) -> str | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value is not None else None


def digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def table_digest(table: pa.Table, columns: Iterable[str], chunk: int = 65536) -> str:
    """Content hash of some columns (used for the scan table, whose content is the run's real input)."""
    h = hashlib.sha256()
    for name in columns:
        column = table.column(name)
        for start in range(0, len(column), chunk):
            for value in column.slice(start, chunk).to_pylist():
                h.update(repr(value).encode())
                h.update(b"\x1f")
    return h.hexdigest()[:16]


def contiguous_groups(batches: Iterable[pa.Table], column: str) -> Iterator[pa.Table]:
    """The rows of each run of equal `column` values, one run at a time (for tables sorted by that column)."""
    pending: list[pa.Table] = []
    current = None
    seen: set = set()
    for batch in batches:
        values = batch.column(column)
        cuts = [0, *(pc.indices_nonzero(pc.not_equal(values[1:], values[:-1])).to_numpy() + 1), batch.num_rows]
        for start, end in itertools.pairwise(cuts):
            if end == start:
                continue
            piece = batch.slice(start, end - start)
            value = piece.column(column)[0].as_py()
            if value != current or not pending:
                if pending:
                    yield pa.concat_tables(pending).combine_chunks()
                if value in seen:
                    raise RuntimeError(f"rows are not grouped by {column} ({value!r} appears twice)")
                seen.add(value)
                pending, current = [], value
            pending.append(piece)
    if pending:
        yield pa.concat_tables(pending).combine_chunks()


class RowReader:
    """The rows of a stream of tables, taken `n` at a time (to walk two tables whose batches do not line up)."""

    def __init__(self, batches: Iterable[pa.Table]):
        self._batches = iter(batches)
        self._pending: pa.Table | None = None

    def take(self, n: int) -> pa.Table:
        pieces = []
        while n:
            if self._pending is None or not self._pending.num_rows:
                self._pending = next(self._batches, None)
                if self._pending is None:
                    raise RuntimeError(f"the table ended {n} row(s) early")
            piece = self._pending.slice(0, n)
            pieces.append(piece)
            n -= piece.num_rows
            self._pending = self._pending.slice(piece.num_rows)
        return pa.concat_tables(pieces) if pieces else pa.table({})


class WorkDir:
    """Paths and table I/O of one run's work folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def table_path(self, stage: str) -> Path:
        return self.root / f"{stage}.parquet"

    def read(self, stage: str) -> pa.Table:
        path = self.table_path(stage)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: run the stage before '{stage}' first (or `dynamicid-curate build`)"
            )
        return pq.read_table(path)

    def write(self, stage: str, table: pa.Table, fingerprint: str) -> None:
        write_parquet(table, self.table_path(stage), fingerprint=fingerprint)

    def is_current(self, stage: str, fingerprint: str) -> bool:
        return read_fingerprint(self.table_path(stage)) == fingerprint

    def store_path(self, name: str) -> Path:
        return self.root / "stores" / name
