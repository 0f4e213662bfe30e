"""Stage `write`: the dataset folder (Parquet shards, identities, rejects, card, summary, report)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynamicid.curation.select import grid_cells
from dynamicid.curation.tables import write_parquet
from dynamicid.schemas import (
    DATASET_COLUMNS,
    EXPRESSIONS,
    POSE_BINS,
    dataset_arrow_schema,
    identities_arrow_schema,
    rejects_arrow_schema,
)

EXPRESSION_ID = {e: i for i, e in enumerate(EXPRESSIONS)}
POSE_ID = {p.name: i for i, p in enumerate(POSE_BINS)}
SHARD_GLOB = "train-*-of-*.parquet"


def dataset_row(row: dict) -> dict:
    out = {c.name: row.get(c.name) for c in DATASET_COLUMNS}
    out["image"] = {"bytes": row["png"], "path": None}
    out["source_sha256"] = row["sha256"]
    out["expression"] = EXPRESSION_ID[row["expression"]]
    out["pose_bin"] = POSE_ID[row["pose_bin"]]
    return out


def sort_key(row: dict) -> tuple[str, str]:
    return (row["identity"], row["source_path"])


def write_shards(out_dir: Path, rows: list[dict], rows_per_file: int, rows_per_row_group: int) -> list[str]:
    """data/train-XXXXX-of-YYYYY.parquet (rows already sorted); old shards are removed first."""
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    for old in data.glob(SHARD_GLOB):
        old.unlink()
    schema = dataset_arrow_schema()
    count = max(1, math.ceil(len(rows) / rows_per_file))
    names = []
    for index in range(count):
        chunk = rows[index * rows_per_file : (index + 1) * rows_per_file]
        name = f"train-{index:05d}-of-{count:05d}.parquet"
        if chunk:
            table = pa.Table.from_pylist(chunk, schema=schema)
            write_parquet(table, data / name, row_group_size=rows_per_row_group, compression="zstd")
        else:  # no row group at all: an empty row group makes readers ask for batches of size 0
            pq.ParquetWriter(data / name, schema).close()
        names.append(f"data/{name}")
    return names


def identities_table(rows: list[dict], scanned: Counter, rejected: Counter, embedding_model: str) -> pa.Table:
    by_identity: dict[str, list[dict]] = {}
    for row in rows:
        by_identity.setdefault(row["identity"], []).append(row)
    out = []
    for identity in sorted(set(scanned) | set(by_identity)):
        kept = by_identity.get(identity, [])
        mean: list[float] = []
        if kept:
            m = np.mean([np.asarray(r["embedding"], np.float32) for r in kept], axis=0)
            mean = (m / max(float(np.linalg.norm(m)), 1e-12)).tolist()
        out.append(
            {
                "identity": identity,
                "num_images": len(kept),
                "num_scanned": scanned.get(identity, 0),
                "num_rejected": rejected.get(identity, 0),
                "grid_cells_covered": grid_cells(
                    [{"expression": r["expression"], "pose_bin": r["pose_bin"]} for r in kept]
                ),
                "mean_embedding": mean,
                "embedding_model": kept[0]["embedding_model"] if kept else embedding_model,
            }
        )
    return pa.Table.from_pylist(out, schema=identities_arrow_schema())


def reason_code(reason: str) -> str:
    """'duplicate_of:<path>' counts as 'duplicate_of' in the summary."""
    return reason.split(":", 1)[0]


def write_tables(
    out_dir: Path,
    kept: list[dict],
    rejects: list[dict],
    scanned_by_identity: Counter,
    rejected_by_identity: Counter,
    embedding_model: str,
    config,
) -> list[str]:
    files = write_shards(out_dir, kept, config.rows_per_file, config.rows_per_row_group)
    write_parquet(
        identities_table(kept, scanned_by_identity, rejected_by_identity, embedding_model),
        out_dir / "identities.parquet",
    )
    rejects = sorted(rejects, key=lambda r: r["source_path"])
    write_parquet(pa.Table.from_pylist(rejects, schema=rejects_arrow_schema()), out_dir / "rejects.parquet")
    return [*files, "identities.parquet", "rejects.parquet"]


def read_dataset(out_dir: Path) -> pa.Table:
    """All rows of a written dataset folder, in file order."""
    files = sorted((out_dir / "data").glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(f"{out_dir} holds no data/{SHARD_GLOB}: is it a dynamicid-curate output folder?")
    return pa.concat_tables([pq.read_table(f) for f in files])


def data_bytes(out_dir: Path) -> int:
    return sum(f.stat().st_size for f in (out_dir / "data").glob(SHARD_GLOB))


def write_summary(out_dir: Path, summary: dict) -> None:
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
