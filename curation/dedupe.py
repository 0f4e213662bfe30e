"""Stage `dedupe`: one copy per picture, the best one.

Two tests: identical bytes (sha256, across the whole run), then near-duplicates: the 256-bit perceptual hash
of the aligned inner face at one common scale (curation/imagehash.py; also against its mirror image) within
`phash_max_distance` bits AND embeddings closer than `dup_embedding_fraction` x the analyzer's same-person
threshold: the same shot resized, recompressed, cropped, letterboxed, mirrored or turned grey. Near-duplicates
are grouped per identity (connected components), so the cost is quadratic only within one identity's photos. The copy kept has the largest face in source pixels, then the
sharpest crop, then the first path; the others are `duplicate_of:<kept source_path>`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynamicid.curation.neighbors import components, hash_pairs
from dynamicid.curation.stages import PHOTO_FIELDS, Stage, StageKind, photo_schema
from dynamicid.schemas import RejectReason

# What dedupe passes on: the photo fields plus, carried from `identify`, the chosen face.
CARRIED = ("face_index", "face", "detection", "describe_key")
IDENTICAL_BYTES = "identical file bytes (same sha256)"


def duplicate_reason(kept_path: str) -> str:
    return f"{RejectReason.DUPLICATE_OF.value}:{kept_path}"


def best_first(rows: list[dict]) -> list[dict]:
    """Largest face, then sharpest, then first path."""

    def key(r: dict) -> tuple:
        x0, y0, x1, y1 = r["detection"]["bbox"]
        return (-min(x1 - x0, y1 - y0), -r["face"]["sharpness"], r["source_path"])

    return sorted(rows, key=key)


def near_duplicate_groups(rows: list[dict], phash_max_distance: int, duplicate_cos: float) -> np.ndarray:
    """Group label per row (rows of one identity): faces whose hashes are close (directly or mirrored) AND whose
    embeddings agree are the same picture; the embedding guards against two different faces that hash alike."""
    hashes = np.array([r["face"]["phash"] for r in rows], np.int64).reshape(len(rows), -1)
    mirrors = np.array([r["face"]["phash_mirror"] for r in rows], np.int64).reshape(len(rows), -1)
    embeddings = np.stack([np.asarray(r["face"]["embedding"], np.float32) for r in rows])
    pairs = hash_pairs(hashes, mirrors, phash_max_distance)
    similar = np.einsum("ij,ij->i", embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]) >= duplicate_cos
    return components(len(rows), pairs[similar])


class ExactDedupeStage(Stage):
    """Identical bytes anywhere in the run (GLOBAL over paths and hashes): the first path (sorted) stays."""

    name = "exact_dedupe"
    kind = StageKind.GLOBAL
    carry_columns = CARRIED

    def output_schema(self) -> pa.Schema:
        return photo_schema()

    def process(self, batch: pa.Table) -> pa.Table:
        first = batch.group_by("sha256").aggregate([("source_path", "min")])
        joined = batch.append_column("_row", pa.array(np.arange(batch.num_rows))).join(first, "sha256").sort_by("_row")
        copy = pc.not_equal(joined.column("source_path"), joined.column("source_path_min"))
        reason = pc.if_else(
            copy,
            pc.binary_join_element_wise(RejectReason.DUPLICATE_OF.value, joined.column("source_path_min"), ":"),
            pa.scalar(None, pa.string()),
        )
        detail = pc.if_else(copy, IDENTICAL_BYTES, pa.scalar(None, pa.string()))
        return pa.table(
            [batch.column("source_path"), batch.column("identity"), batch.column("sha256"), reason, detail],
            schema=pa.schema(PHOTO_FIELDS),
        )


DEDUPE_SCHEMA = photo_schema(("all_kept", pa.bool_()))


class NearDedupeStage(Stage):
    """Perceptual-hash and embedding near-duplicates inside one identity (GROUP); the best copy stays.

    `all_kept`: the identity's remaining photos fit its quota (between --min-per-identity and --per-identity), so
    `select` will keep every one that passes `align`, which may then store their crops at once."""

    name = "dedupe"
    kind = StageKind.GROUP
    input_columns = ("source_path", "identity", "sha256", "face", "detection")
    carry_columns = CARRIED

    def output_schema(self) -> pa.Schema:
        return DEDUPE_SCHEMA

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            row["reason"] = row["detail"] = None
        labels = near_duplicate_groups(rows, self.config.phash_max_distance, self.context.backend.duplicate_cos)
        for label in np.unique(labels):
            members = best_first([r for r, lab in zip(rows, labels, strict=True) if lab == label])
            for copy in members[1:]:
                copy["reason"] = duplicate_reason(members[0]["source_path"])
                copy["detail"] = (
                    "same picture as the kept copy (perceptual hash and embedding), which is larger or sharper"
                )
        remaining = sum(r["reason"] is None for r in rows)
        fits = self.config.min_per_identity <= remaining <= self.config.per_identity
        for row in rows:
            row["all_kept"] = fits and row["reason"] is None
        return pa.Table.from_pylist(rows, schema=DEDUPE_SCHEMA)


def resolve_identical_copies(rejects: pa.Table) -> pa.Table:
    """A byte-identical copy points at the copy finally kept, not at one that lost to a better version.

    `rejects` has source_path, reason, detail; the identical-bytes rejects whose first copy was itself dropped
    as a near-duplicate of X are rewritten to `duplicate_of:X` (GLOBAL, small columns).
    """
    prefix = f"{RejectReason.DUPLICATE_OF.value}:"
    is_copy = pc.fill_null(pc.equal(rejects.column("detail"), IDENTICAL_BYTES), False)
    lost = rejects.filter(
        pc.and_(pc.invert(is_copy), pc.starts_with(pc.fill_null(rejects.column("reason"), ""), prefix))
    ).select(["source_path", "reason"])
    if lost.num_rows == 0 or not pc.any(is_copy).as_py():
        return rejects
    target = pc.utf8_slice_codeunits(pc.if_else(is_copy, rejects.column("reason"), ""), len(prefix))
    renamed = lost.rename_columns(["_target", "_final"])
    joined = (
        rejects.append_column("_target", target)
        .append_column("_row", pa.array(np.arange(rejects.num_rows)))
        .join(renamed, "_target", join_type="left outer")
        .sort_by("_row")
    )
    reason = pc.if_else(
        pc.and_(is_copy, pc.is_valid(joined.column("_final"))), joined.column("_final"), rejects.column("reason")
    )
    return rejects.set_column(rejects.schema.get_field_index("reason"), "reason", reason)
