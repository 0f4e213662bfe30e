"""Content-keyed result stores: expensive per-photo results (detections, face descriptions, crops) on disk.

A store is a folder of Parquet parts, each with a string `key` column. Writers append whole parts (atomic
rename, unique names), so several processes or machines may write one store at once and a run killed at any
moment loses at most the parts being written. Readers keep only an index in memory: a 64-bit hash of every
key with its part and row (16 bytes per result), and read the few row groups that hold the keys they ask for,
so memory does not grow with the results' size (a 512 px crop, 478 landmarks) but only with their count.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamicid.curation.tables import TableWriter, write_parquet

KEY = "key"
KEY64 = "key64"  # uint64 hash of the key, stored beside it so the index loads without touching the results
_MERGE_EVERY = 4096  # new index entries are merged into the sorted arrays in chunks of this many
_SMALL_PART = 1 << 20  # `compact` merges parts smaller than this ...
_COMPACT_TARGET = 16 << 20  # ... into parts of about this size


def key64(keys: Iterable[str]) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys], np.uint64
    )


class ResultStore:
    """Rows keyed by `key` in `folder`; `get` returns them by key, `put` appends a part."""

    def __init__(self, folder: Path, schema: pa.Schema, *, row_group_rows: int = 16):
        if schema.names[0] != KEY:
            raise ValueError(f"a store's first column must be {KEY!r}, got {schema.names[0]!r}")
        self.folder = Path(folder)
        self.schema = schema
        self.file_schema = schema.append(pa.field(KEY64, pa.uint64()))
        self.row_group_rows = row_group_rows
        self._parts: list[Path] = []
        self._hash = np.zeros(0, np.uint64)  # sorted
        self._where = np.zeros((0, 2), np.int32)  # part number, row (int32: 16 bytes a result with the hash)
        self._new_hash: list[np.ndarray] = []
        self._new_where: list[np.ndarray] = []
        self._open: tuple[int, pq.ParquetFile] | None = None
        self._counter = itertools.count()
        self._loaded = False

    def _load(self) -> None:
        """Read the key hashes of every part (parts from an older schema or a damaged disk are ignored)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._parts, hashes, where = [], [], []
        for path in sorted(self.folder.glob("part-*.parquet")):
            try:
                if pq.read_schema(path).remove_metadata() != self.file_schema:
                    continue
                column = pq.read_table(path, columns=[KEY64]).column(KEY64).to_numpy()
            except (OSError, pa.ArrowInvalid):
                continue
            number = len(self._parts)
            self._parts.append(path)
            hashes.append(column)
            where.append(np.stack([np.full(len(column), number), np.arange(len(column))], axis=1))
        self._hash, self._where = self._sorted(hashes, where)
        self._loaded = True

    @staticmethod
    def _sorted(hashes: list[np.ndarray], where: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not hashes:
            return np.zeros(0, np.uint64), np.zeros((0, 2), np.int32)
        h = np.concatenate(hashes).astype(np.uint64)
        w = np.concatenate(where).astype(np.int32).reshape(-1, 2)
        order = np.argsort(h, kind="stable")  # stable: of equal keys, the earliest part wins
        return h[order], w[order]

    def _merge_new(self) -> None:
        if self._new_hash:
            self._hash, self._where = self._sorted([self._hash, *self._new_hash], [self._where, *self._new_where])
            self._new_hash, self._new_where = [], []

    def locate(self, keys: list[str]) -> np.ndarray:
        """(part number, row) per key; (-1, -1) where the store does not hold it."""
        if not self._loaded:
            self._load()
        self._merge_new()
        hashes = key64(keys)
        where = np.full((len(keys), 2), -1, np.int64)
        if not len(self._hash):
            return where
        at = np.searchsorted(self._hash, hashes)
        found = (at < len(self._hash)) & (self._hash[np.minimum(at, len(self._hash) - 1)] == hashes)
        where[found] = self._where[at[found]]
        return where

    def get(self, keys: list[str]) -> tuple[np.ndarray, pa.Table]:
        """A mask of the keys found, and their rows in the order of `keys` (only the found ones)."""
        where = self.locate(keys)
        found = where[:, 0] >= 0
        pieces: list[pa.Table] = []
        positions: list[np.ndarray] = []
        for part in np.unique(where[found, 0]):
            wanted = np.nonzero(where[:, 0] == part)[0]
            pieces.append(self._read_rows(int(part), where[wanted, 1]))
            positions.append(wanted)
        if not pieces:
            return found, self.schema.empty_table()
        table = pa.concat_tables(pieces)
        # Reading row groups of many part files leaves freed pages in Arrow's allocator, more with every file
        # read (~0.1 MB per 512 px crop read in `write`, measured): hand them back.
        pa.default_memory_pool().release_unused()
        order = np.argsort(np.concatenate(positions), kind="stable")
        table = table.take(pa.array(order))
        checked = pc.all(pc.equal(table.column(KEY), pa.array([keys[i] for i in np.nonzero(found)[0]]))).as_py()
        if not checked:  # a 64-bit hash collision: astronomically rare, but never return another photo's result
            raise RuntimeError(f"key hash collision in {self.folder}; delete that folder and rerun")
        return found, table

    def _read_rows(self, part: int, rows: np.ndarray) -> pa.Table:
        """Rows of one part, reading only the row groups that hold them."""
        if self._open is None or self._open[0] != part:
            self._open = (part, pq.ParquetFile(self._parts[part]))
        file = self._open[1]
        starts = np.cumsum([0, *(file.metadata.row_group(i).num_rows for i in range(file.num_row_groups))])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        groups = np.unique(group_of)
        table = file.read_row_groups(groups.tolist(), columns=self.schema.names)
        sizes = starts[groups + 1] - starts[groups]
        offset_of_group = dict(zip(groups.tolist(), np.cumsum([0, *sizes[:-1]]).tolist(), strict=True))
        local = np.array([offset_of_group[g] for g in group_of.tolist()], np.int64) + rows - starts[group_of]
        return table.take(pa.array(local)).cast(self.schema)

    def put(self, table: pa.Table) -> None:
        """Append these rows as a new part (atomic; unique name, so concurrent writers never collide)."""
        if table.num_rows == 0:
            return
        if not self._loaded:
            self._load()
        table = table.cast(self.schema)
        hashes = key64(table.column(KEY).to_pylist())
        name = self._part_name()
        write_parquet(
            table.append_column(KEY64, pa.array(hashes, pa.uint64())),
            self.folder / name,
            row_group_size=self.row_group_rows,
        )
        number = len(self._parts)
        self._parts.append(self.folder / name)
        self._new_hash.append(hashes)
        self._new_where.append(np.stack([np.full(len(hashes), number), np.arange(len(hashes))], axis=1))
        if sum(len(h) for h in self._new_hash) >= _MERGE_EVERY:
            self._merge_new()

    def compact(self) -> None:
        """Merge small parts into bigger ones (streamed: one small part in memory at a time); run with no writers."""
        self._load()
        small = [p for p in self._parts if p.stat().st_size < _SMALL_PART]
        if len(small) < 2:
            return
        runs: list[list[Path]] = [[]]
        size = 0
        for path in small:
            runs[-1].append(path)
            size += path.stat().st_size
            if size >= _COMPACT_TARGET:
                runs.append([])
                size = 0
        for run in filter(None, runs):
            with TableWriter(
                self.folder / self._part_name(), self.file_schema, row_group_rows=self.row_group_rows
            ) as merged:
                for path in run:
                    merged.write(pq.read_table(path, schema=self.file_schema))
        for path in small:
            path.unlink(missing_ok=True)
        self._load()

    def _part_name(self) -> str:
        """Unique across processes and machines writing one store (time, pid, counter)."""
        return f"part-{time.time_ns():020d}-{os.getpid()}-{next(self._counter)}.parquet"


def fetch_or_compute(
    store: ResultStore, keys: list[str], compute: Callable[[str], dict]
) -> tuple[dict[str, dict], set[str]]:
    """The rows of `keys` (one batch), computing and storing the missing ones; also which keys were computed."""
    return fetch_or_compute_many(store, keys, lambda missing: [compute(key) for key in missing])


def fetch_or_compute_many(
    store: ResultStore, keys: list[str], compute_many: Callable[[list[str]], list[dict]]
) -> tuple[dict[str, dict], set[str]]:
    """`fetch_or_compute` with the missing keys computed in one call (a batch for the models)."""
    unique = list(dict.fromkeys(keys))
    found, table = store.get(unique)
    rows = {row[KEY]: row for row in table.to_pylist()}
    missing = [key for key, there in zip(unique, found.tolist(), strict=True) if not there]
    new = compute_many(missing) if missing else []
    store.put(pa.Table.from_pylist(new, schema=store.schema))
    rows.update({row[KEY]: row for row in new})
    return rows, set(missing)
