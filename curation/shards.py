"""The dataset's shard files, each written by one call where the workers run (`Engine.map_calls`).

The driver walks the kept rows' labels (a few KB a row) and hands each shard's rows to a worker, which reads
their crops from the crop store a row group at a time (the bulk of the bytes) and writes the file. With
`--workers N` the shards are written N at a time while the driver goes on with the next shard's rows.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from dynamicid.curation.crop import crop_store, stored_crops
from dynamicid.curation.store import ResultStore
from dynamicid.curation.tables import TableWriter
from dynamicid.curation.write import SHARD_COMPRESSION, with_images

_READER: tuple[Path, list[str], ResultStore] | None = None  # this process's crop store reader (work folder, parts)


def _crop_reader(work_dir: Path) -> ResultStore:
    """The crop store, its index (16 bytes a crop, from every part's key hashes) read once per process for all the
    shards of a run, not once per shard; read again when its parts changed (another run, another work folder)."""
    global _READER
    parts = sorted(path.name for path in crop_store(work_dir).folder.glob("part-*.parquet"))
    if _READER is None or _READER[:2] != (work_dir, parts):
        _READER = (work_dir, parts, crop_store(work_dir))
    return _READER[2]


def write_shard(path: Path, rows: pa.Table, crop_keys: list[str], work_dir: Path, rows_per_row_group: int) -> int:
    """One shard file from `dataset_table` rows without their images and those rows' crop keys; returns its rows."""
    crops = _crop_reader(work_dir)
    with TableWriter(path, rows.schema, row_group_rows=rows_per_row_group, compression=SHARD_COMPRESSION) as writer:
        for start in range(0, rows.num_rows, rows_per_row_group):
            keys = crop_keys[start : start + rows_per_row_group]
            pngs = stored_crops(crops, keys)
            writer.write(with_images(rows.slice(start, len(keys)), pngs.combine_chunks()))
    return rows.num_rows
