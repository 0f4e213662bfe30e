"""The work folder: one Parquet table per stage, plus append-only caches of per-photo results.

Expensive results (face detection, description, alignment) are keyed by the photo's content hash and
appended to `<work>/<cache>/part-NNNNN.parquet` in small batches while a stage runs, so a run killed at any
moment loses at most one batch and the next run computes only what is missing. A stage's finished table
`<work>/<stage>.parquet` carries a fingerprint of its inputs in the Parquet metadata; when the fingerprint of
the next run matches, the stage is skipped entirely.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FINGERPRINT_KEY = b"dynamicid_fingerprint"


def write_parquet(table: pa.Table, path: Path, *, fingerprint: str | None = None, **options: Any) -> None:
    """Write atomically (temp file + rename): a reader never sees half a table, even after a SIGKILL."""
    if fingerprint is not None:
        metadata = dict(table.schema.metadata or {})
        metadata[FINGERPRINT_KEY] = fingerprint.encode()
        table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, **options)
    os.replace(tmp, path)


def read_fingerprint(path: Path) -> str | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(FINGERPRINT_KEY)
    return value.decode() if value is not None else None


def digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def table_digest(table: pa.Table, columns: Iterable[str]) -> str:
    """Content hash of some columns (used for the scan table, whose content is the run's real input)."""
    h = hashlib.sha256()
    for name in columns:
        for value in table.column(name).to_pylist():
            h.update(repr(value).encode())
            h.update(b"\x1f")
    return h.hexdigest()[:16]


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

    def cache(self, name: str, schema: pa.Schema, key: str) -> ResultCache:
        return ResultCache(self.root / name, schema, key)


class ResultCache:
    """Rows keyed by `key` (a content hash), appended in batches; later rows win over earlier ones."""

    def __init__(self, folder: Path, schema: pa.Schema, key: str, *, flush_rows: int = 16, flush_seconds: float = 15):
        self.folder = folder
        self.schema = schema
        self.key = key
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._pending: list[dict] = []
        self._last_flush = time.monotonic()
        folder.mkdir(parents=True, exist_ok=True)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for part in self._parts():
            try:
                table = pq.read_table(part, schema=self.schema)
            except (OSError, pa.ArrowInvalid):
                continue  # a part from an older schema or a damaged disk: its rows are recomputed
            for row in table.to_pylist():
                rows[row[self.key]] = row
        return rows

    def add(self, row: dict) -> None:
        self._pending.append(row)
        if len(self._pending) >= self.flush_rows or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        parts = self._parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        table = pa.Table.from_pylist(self._pending, schema=self.schema)
        write_parquet(table, self.folder / f"part-{number:05d}.parquet")
        self._pending = []
        self._last_flush = time.monotonic()

    def compact(self) -> None:
        """Rewrite all parts as one, so part counts stay small across runs."""
        self.flush()
        parts = self._parts()
        if len(parts) <= 1:
            return
        rows = self.load()
        ordered = [rows[k] for k in sorted(rows)]
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 0
        write_parquet(pa.Table.from_pylist(ordered, schema=self.schema), self.folder / f"part-{number:05d}.parquet")
        for part in parts:
            part.unlink(missing_ok=True)
