"""`inspect`: counts per identity, label histograms and the unsure expression labels of a curated dataset folder."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynamicid.schemas import EXPRESSION_CONFIDENCE_LOW, EXPRESSIONS, POSE_BINS, unsure_expression
from dynamicid.schemas.dataset_folder import dataset_files, open_dataset

UNSURE_EXAMPLES = 20  # the least confident labels listed by name


def expression_confidence(rows: list[dict]) -> dict:
    """Per expression: mean label confidence and the number of unsure labels; the least confident rows."""
    by_expression: dict[str, list[float]] = {}
    for r in rows:
        by_expression.setdefault(EXPRESSIONS[r["expression"]], []).append(r["expression_confidence"])
    unsure = sorted(
        (r for r in rows if unsure_expression(r["expression_confidence"])),
        key=lambda r: (r["expression_confidence"], r["source_path"]),
    )
    return {
        "threshold": EXPRESSION_CONFIDENCE_LOW,
        "by_expression": {
            e: {"mean": round(sum(c) / len(c), 3), "unsure": sum(map(unsure_expression, c))}
            for e, c in sorted(by_expression.items(), key=lambda item: EXPRESSIONS.index(item[0]))
        },
        "unsure": len(unsure),
        "least_confident": [
            {
                "source_path": r["source_path"],
                "expression": EXPRESSIONS[r["expression"]],
                "confidence": round(r["expression_confidence"], 3),
            }
            for r in unsure[:UNSURE_EXAMPLES]
        ],
    }


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
    columns = ["identity", "source_path", "expression", "expression_confidence", "pose_bin"]
    rows = open_dataset(out_dir, columns).to_pylist()
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
        "expression_confidence": expression_confidence(rows),
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
        if title == "expression":
            lines.extend(_confidence_lines(report["expression_confidence"]))
    return "\n".join(lines)


def _confidence_lines(confidence: dict) -> list[str]:
    threshold = confidence["threshold"]
    lines = ["", f"expression confidence (labels under {threshold} are unsure):"]
    for expression, figures in confidence["by_expression"].items():
        lines.append(f"  {expression:<10} mean {figures['mean']:.2f}  unsure {figures['unsure']:>5}")
    if confidence["least_confident"]:
        lines.append(f"  unsure labels ({confidence['unsure']}), least confident first:")
        for r in confidence["least_confident"]:
            lines.append(f"    {r['confidence']:.2f} {r['expression']:<10} {r['source_path']}  UNSURE")
        if confidence["unsure"] > len(confidence["least_confident"]):
            lines.append(f"    ... and {confidence['unsure'] - len(confidence['least_confident'])} more")
    return lines
