"""`inspect`: counts per identity and label histograms of a curated dataset folder."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamicid.curation.write import dataset_files, read_dataset
from dynamicid.schemas import EXPRESSIONS, POSE_BINS

# Bin edges of the upscale histogram (crop pixels per source pixel); a bin holds (previous edge, edge].
UPSCALE_EDGES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
UPSCALE_BINS = (
    f"<= {UPSCALE_EDGES[0]:g}x",
    *(f"{a:g}-{b:g}x" for a, b in itertools.pairwise(UPSCALE_EDGES)),
    f"> {UPSCALE_EDGES[-1]:g}x",
)


def upscale_histogram(out_dir: Path) -> dict[str, int]:
    """Kept rows per `quality.upscale` bin (streamed; empty for a dataset written without the column)."""
    counts = np.zeros(len(UPSCALE_BINS), np.int64)
    for path in dataset_files(out_dir):
        file = pq.ParquetFile(path)
        if "upscale" not in [f.name for f in file.schema_arrow.field("quality").type]:
            return {}
        for batch in file.iter_batches(columns=["quality"]):
            values = pc.struct_field(batch.column(0), "upscale").to_numpy(zero_copy_only=False)
            counts += np.bincount(np.searchsorted(UPSCALE_EDGES, values), minlength=len(UPSCALE_BINS))
    return dict(zip(UPSCALE_BINS, counts.tolist(), strict=True))


def inspect_dataset(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    rows = read_dataset(out_dir, ["identity", "expression", "pose_bin"]).to_pylist()
    identities = pq.read_table(out_dir / "identities.parquet").to_pylist()
    rejects = pq.read_table(out_dir / "rejects.parquet").column("reason").to_pylist()
    summary = json.loads((out_dir / "summary.json").read_text())
    return {
        "rows": len(rows),
        "identities": {
            i["identity"]: {
                "images": i["num_images"],
                "scanned": i["num_scanned"],
                "rejected": i["num_rejected"],
                "grid_cells_covered": i["grid_cells_covered"],
            }
            for i in identities
        },
        "expression": {
            e: n for e, n in ((EXPRESSIONS[k], v) for k, v in sorted(Counter(r["expression"] for r in rows).items()))
        },
        "pose_bin": {
            p: n for p, n in ((POSE_BINS[k].name, v) for k, v in sorted(Counter(r["pose_bin"] for r in rows).items()))
        },
        "upscale": upscale_histogram(out_dir),
        "rejected_by_reason": dict(sorted(Counter(r.split(":", 1)[0] for r in rejects).items())),
        "scanned": summary["scanned"],
        "embedding_model": summary["embedding_model"],
    }


def format_inspection(report: dict) -> str:
    lines = [f"{report['rows']} rows, {len(report['identities'])} identities, {report['scanned']} files scanned", ""]
    lines.append(f"{'identity':<32} {'images':>6} {'scanned':>7} {'rejected':>8} {'cells':>5}")
    for name, i in report["identities"].items():
        lines.append(f"{name:<32} {i['images']:>6} {i['scanned']:>7} {i['rejected']:>8} {i['grid_cells_covered']:>5}")
    for title in ("expression", "pose_bin", "upscale", "rejected_by_reason"):
        lines.append("")
        lines.append(f"{title}:")
        width = max((len(k) for k in report[title]), default=0)
        top = max(report[title].values(), default=1)
        for key, n in report[title].items():
            lines.append(
                f"  {key:<{width}} {n:>6} {'#' * max(1, round(30 * n / top))}" if n else f"  {key:<{width}} {n:>6}"
            )
    return "\n".join(lines)
