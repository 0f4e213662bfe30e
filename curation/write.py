"""Stage `write`: the dataset folder (Parquet shards, identities, rejects, card, summary, report).

The driver streams the selected rows' labels, a shard at a time, to the calls that write the shard files with
their crops (`curation.shards`, in the workers); it holds only per-identity figures (counts, mean embedding),
never the rows.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynamicid.curation.select import grid_cells
from dynamicid.schemas import (
    EXPRESSIONS,
    POSE_BINS,
    dataset_arrow_schema,
    identities_arrow_schema,
)
from dynamicid.schemas.dataset_folder import DATA_DIR, SHARD_GLOB, shard_name

CLASS_NAMES = {"expression": list(EXPRESSIONS), "pose_bin": [p.name for p in POSE_BINS]}  # ClassLabel names
SHARD_COMPRESSION = "zstd"  # of the shards' columns other than the images (see tables.parquet_options)
TALLY_COLUMNS = ["identity", "embedding", "embedding_model", "expression", "pose_bin"]  # what IdentityTally reads


def dataset_table(labels: pa.Table) -> pa.Table:
    """Dataset rows from `label` rows, their `image` still null: `with_images` fills it where the shard is written."""
    schema = dataset_arrow_schema()
    columns = []
    for field in schema:
        if field.name == "source_sha256":
            column = labels.column("sha256")
        elif field.name in CLASS_NAMES:
            column = pc.index_in(labels.column(field.name), value_set=pa.array(CLASS_NAMES[field.name]))
            if column.null_count:
                raise ValueError(f"label.parquet holds a {field.name} that is not a class name; rerun the build")
        elif field.name in labels.column_names:
            column = labels.column(field.name)
        else:
            column = pa.nulls(labels.num_rows, field.type)
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def with_images(rows: pa.Table, pngs: pa.Array) -> pa.Table:
    """`dataset_table` rows with their crops' PNG bytes in `image` (the `datasets.Image` struct: bytes, path), in
    Arrow: a Python bytes object per crop (~150 KB, the bulk of the bytes) would leave the heap fragmented."""
    index = rows.schema.get_field_index("image")
    field = rows.schema.field(index)
    images = pa.StructArray.from_arrays([pngs, pa.nulls(len(pngs), pa.string())], fields=list(field.type))
    return rows.set_column(index, field, images)


def shard_names(total_rows: int, rows_per_file: int) -> list[str]:
    """data/train-XXXXX-of-YYYYY.parquet for `total_rows` rows, `rows_per_file` a file (one file for no rows)."""
    count = max(1, math.ceil(total_rows / rows_per_file))
    return [shard_name(index, count) for index in range(count)]


def clear_shards(out_dir: Path) -> None:
    """Remove an earlier run's shards (their count may differ) before new ones are written."""
    data = out_dir / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    for old in data.glob(SHARD_GLOB):
        old.unlink()


class IdentityTally:
    """Per identity of the kept rows (streamed in identity order): count, grid cells, mean embedding."""

    def __init__(self) -> None:
        self.kept: dict[str, dict] = {}
        self._current: str | None = None
        self._rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            if row["identity"] != self._current:
                self.finish()
                self._current = row["identity"]
            self._rows.append({k: row[k] for k in TALLY_COLUMNS})

    def finish(self) -> None:
        """Close the identity being added (call after the last rows)."""
        if self._rows:
            m = np.mean([np.asarray(r["embedding"], np.float32) for r in self._rows], axis=0)
            self.kept[self._rows[0]["identity"]] = {
                "num_images": len(self._rows),
                "grid_cells_covered": grid_cells(self._rows),
                "mean_embedding": m / max(float(np.linalg.norm(m)), 1e-12),  # float32 while held: 4 bytes a value
                "embedding_model": self._rows[0]["embedding_model"],
            }
        self._rows = []

    def table(self, scanned: Counter, rejected: Counter, embedding_model: str) -> pa.Table:
        out = []
        for identity in sorted(set(scanned) | set(self.kept)):
            kept = self.kept.get(identity)
            out.append(
                {
                    "identity": identity,
                    "num_images": kept["num_images"] if kept else 0,
                    "num_scanned": scanned.get(identity, 0),
                    "num_rejected": rejected.get(identity, 0),
                    "grid_cells_covered": kept["grid_cells_covered"] if kept else 0,
                    "mean_embedding": kept["mean_embedding"].tolist() if kept else [],
                    "embedding_model": kept["embedding_model"] if kept else embedding_model,
                }
            )
        return pa.Table.from_pylist(out, schema=identities_arrow_schema())


def reason_code(reason: str) -> str:
    """'duplicate_of:<path>' counts as 'duplicate_of' in the summary."""
    return reason.split(":", 1)[0]


def data_bytes(out_dir: Path) -> int:
    return sum(f.stat().st_size for f in (out_dir / DATA_DIR).glob(SHARD_GLOB))


def write_summary(out_dir: Path, summary: dict) -> None:
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
