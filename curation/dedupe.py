"""Stage `dedupe`: one copy per picture, the best one.

Three tests, cheapest first: identical bytes (sha256, across the whole run), the perceptual hash of the
ArcFace-aligned face crop (also against its mirror image), and embedding near-duplicates (distance below
`dup_embedding_fraction` x the analyzer's same-person threshold: the same shot resized, recompressed,
cropped or mirrored). Near-duplicates are grouped per identity (connected components), so the cost is
quadratic only within one identity's photos. The copy kept has the largest face in source pixels, then the
sharpest crop, then the first path; the others are `duplicate_of:<kept source_path>`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dynamicid.curation.detect import FACE_BOX
from dynamicid.curation.identify import FACE_DESCRIPTION
from dynamicid.curation.neighbors import components, hash_pairs, similar_pairs
from dynamicid.curation.run import Run, candidates, photo_schema
from dynamicid.schemas import RejectReason

DEDUPE_SCHEMA = photo_schema(("face_index", pa.int32()), ("face", FACE_DESCRIPTION), ("detection", FACE_BOX))


def duplicate_reason(kept_path: str) -> str:
    return f"{RejectReason.DUPLICATE_OF.value}:{kept_path}"


def best_first(rows: list[dict]) -> list[dict]:
    """Largest face, then sharpest, then first path."""

    def key(r: dict) -> tuple:
        x0, y0, x1, y1 = r["detection"]["bbox"]
        return (-min(x1 - x0, y1 - y0), -r["face"]["sharpness"], r["source_path"])

    return sorted(rows, key=key)


def near_duplicate_groups(rows: list[dict], phash_max_distance: int, duplicate_cos: float) -> np.ndarray:
    """Group label per row (rows of one identity)."""
    hashes = np.array([r["face"]["phash"] for r in rows], np.int64)
    mirrors = np.array([r["face"]["phash_mirror"] for r in rows], np.int64)
    embeddings = np.stack([np.asarray(r["face"]["embedding"], np.float32) for r in rows])
    edges = np.concatenate([hash_pairs(hashes, mirrors, phash_max_distance), similar_pairs(embeddings, duplicate_cos)])
    return components(len(rows), edges)


def dedupe(run: Run, identify_table: pa.Table) -> pa.Table:
    rows = []
    for photo in candidates(identify_table):
        index = photo["face_index"]
        position = [f["face_index"] for f in photo["faces"]].index(index)
        rows.append(
            {
                **{k: photo[k] for k in ("source_path", "identity", "sha256")},
                "face_index": index,
                "face": photo["faces"][position],
                "detection": photo["detections"][index],
                "reason": None,
                "detail": None,
            }
        )
    with run.stage_timer("dedupe") as stats:
        # Identical bytes anywhere in the run: the first path (sorted) stands for them in the near-duplicate test.
        first_with_bytes: dict[str, str] = {}
        for row in rows:
            kept = first_with_bytes.setdefault(row["sha256"], row["source_path"])
            if kept != row["source_path"]:
                row["reason"], row["detail"] = duplicate_reason(kept), "identical file bytes (same sha256)"
        by_identity: dict[str, list[dict]] = {}
        for row in rows:
            if row["reason"] is None:
                by_identity.setdefault(row["identity"], []).append(row)
        kept_for: dict[str, str] = {}
        for group_rows in by_identity.values():
            labels = near_duplicate_groups(group_rows, run.config.phash_max_distance, run.duplicate_cos)
            for label in np.unique(labels):
                members = best_first([r for r, lab in zip(group_rows, labels, strict=True) if lab == label])
                for copy in members[1:]:
                    copy["reason"] = duplicate_reason(members[0]["source_path"])
                    copy["detail"] = (
                        "same picture as the kept copy (perceptual hash or embedding), which is larger or sharper"
                    )
                    kept_for[copy["source_path"]] = members[0]["source_path"]
        # Byte-identical copies point at the copy finally kept, not at one that lost to a better version.
        for row in rows:
            standing_in = first_with_bytes[row["sha256"]]
            if standing_in != row["source_path"] and standing_in in kept_for:
                row["reason"] = duplicate_reason(kept_for[standing_in])
        stats.computed += len(rows)
    return pa.Table.from_pylist([{k: r.get(k) for k in DEDUPE_SCHEMA.names} for r in rows], schema=DEDUPE_SCHEMA)
