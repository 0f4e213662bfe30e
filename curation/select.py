"""Stage `select`: at most `per_identity` images per identity, grid first, then the most different faces.

1. Grid: each (expression, pose bin) cell present among the identity's faces gets its best face (a sure
   expression label first: confidence at least schemas.labels.EXPRESSION_CONFIDENCE_LOW; then the least
   enlarged crop, crops at native resolution counting alike; then largest, then sharpest, then first path);
   rarer cells first, so when there are more cells than room the rare ones are still covered.
2. Diversity: the rest of the quota goes by farthest-point sampling on the embeddings: repeatedly the face
   whose nearest already-selected face is farthest (ties: first path).
Identities with fewer than `min_per_identity` images are rejected whole (too_few_images). Deterministic.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from dynamicid.curation.stages import Stage, StageKind, photo_schema
from dynamicid.schemas import EXPRESSIONS, POSE_BINS, RejectReason, unsure_expression

SELECT_SCHEMA = photo_schema(("selection", pa.string()))  # selection: "grid" or "diversity" for the kept
CELL_ORDER = {(e, p.name): i for i, (e, p) in enumerate((e, p) for e in EXPRESSIONS for p in POSE_BINS)}


def quality_order(row: dict) -> tuple:
    q = row["quality"]
    unsure = unsure_expression(row["expression_confidence"])  # the cell's face should show its expression
    # Crops at or below native resolution count alike, then the least enlarged (max_upscale only bounds it).
    return (unsure, max(q["upscale"], 1.0), -q["face_size"], -q["sharpness"], row["source_path"])


def choose(rows: list[dict], quota: int) -> dict[str, str]:
    """source_path -> 'grid' | 'diversity' for the chosen rows of one identity."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["expression"], row["pose_bin"]), []).append(row)
    chosen: dict[str, str] = {}
    for cell in sorted(cells, key=lambda c: (len(cells[c]), CELL_ORDER[c])):
        if len(chosen) == quota:
            return chosen
        chosen[min(cells[cell], key=quality_order)["source_path"]] = "grid"
    rest = sorted((r for r in rows if r["source_path"] not in chosen), key=lambda r: r["source_path"])
    if not rest or len(chosen) == quota:
        return chosen
    picked = np.stack([np.asarray(r["embedding"], np.float32) for r in rows if r["source_path"] in chosen])
    pool = np.stack([np.asarray(r["embedding"], np.float32) for r in rest])
    nearest = (1.0 - pool @ picked.T).min(axis=1)
    taken = np.zeros(len(rest), bool)
    while len(chosen) < quota and not taken.all():
        best = int(np.argmax(np.where(taken, -np.inf, nearest)))  # argmax takes the first of equal values
        taken[best] = True
        chosen[rest[best]["source_path"]] = "diversity"
        nearest = np.minimum(nearest, 1.0 - pool @ pool[best])
    return chosen


def grid_cells(rows: list[dict]) -> int:
    return len(Counter((r["expression"], r["pose_bin"]) for r in rows))


class SelectStage(Stage):
    name = "select"
    kind = StageKind.GROUP
    carry_columns = ("crop_key", "crop_transform")  # what `crop` needs to make the kept faces' crops
    input_columns = (
        "source_path",
        "identity",
        "sha256",
        "expression",
        "expression_confidence",
        "pose_bin",
        "quality",
        "embedding",
    )

    def output_schema(self) -> pa.Schema:
        return SELECT_SCHEMA

    def process(self, batch: pa.Table) -> pa.Table:
        """One identity's rows: too_few_images for all of them, or the chosen ones and over_quota for the rest."""
        config = self.config
        rows = batch.to_pylist()
        identity = rows[0]["identity"] if rows else ""
        if len(rows) < config.min_per_identity:
            detail = (
                f"identity '{identity}' has {len(rows)} usable image(s), fewer than --min-per-identity "
                f"{config.min_per_identity}"
            )
            chosen: dict[str, str] = {}
            reason = RejectReason.TOO_FEW_IMAGES.value
        else:
            chosen = choose(rows, config.per_identity)
            detail = (
                f"identity '{identity}' already has {config.per_identity} images (grid cells first, then the "
                "most different faces)"
            )
            reason = RejectReason.OVER_QUOTA.value
        out = []
        for row in rows:
            how = chosen.get(row["source_path"])
            out.append(
                {
                    **{k: row[k] for k in ("source_path", "identity", "sha256")},
                    "reason": None if how else reason,
                    "detail": None if how else detail,
                    "selection": how,
                }
            )
        return pa.Table.from_pylist(out, schema=SELECT_SCHEMA)
