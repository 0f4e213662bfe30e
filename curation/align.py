"""Stage `align`: the FFHQ-style crop with context of the chosen face: its transform and the crop's quality.

Each crop is measured here (transform, quality: the align store), but kept only when its face is sure to be in
the dataset: it passes here and its identity fits its quota (dedupe's `all_kept`). The other kept faces, of
identities `select` cuts, are cropped again by the `crop` stage (`curation/crop.py`) once `select` has chosen,
so the crop store holds about the dataset's crops. Both stores are keyed by `crop_key`.
"""

from __future__ import annotations

import pyarrow as pa

from dynamicid.curation.analysis import align_face
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.crop import CropStores, crop_key
from dynamicid.curation.dedupe import CARRIED
from dynamicid.curation.stages import COMPUTED, Stage, photo_schema
from dynamicid.curation.store import ResultStore, fetch_or_compute
from dynamicid.schemas import RejectReason

ALIGN_STORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("matrix", pa.list_(pa.float32(), 6)),
        ("sharpness", pa.float32()),
        ("brightness", pa.float32()),
        ("error", pa.string()),  # why no crop could be made (then the photo is rejected)
    ]
)
ALIGN_SCHEMA = photo_schema(
    ("crop_key", pa.string()),
    ("matrix", pa.list_(pa.float32(), 6)),
    ("crop_sharpness", pa.float32()),
    ("crop_brightness", pa.float32()),
)


def align_store(work_dir) -> ResultStore:
    return ResultStore(work_dir / "stores" / "align", ALIGN_STORE_SCHEMA)


def quality_problem(c: CurationConfig, sharp: float, bright: float) -> str | None:
    if sharp < c.min_sharpness:
        return f"blurred: crop sharpness {sharp:.1f} < {c.min_sharpness}"
    if not c.min_brightness <= bright <= c.max_brightness:
        return f"exposure: crop brightness {bright:.2f} outside [{c.min_brightness}, {c.max_brightness}]"
    return None


class AlignStage(Stage):
    name = "align"
    input_columns = ("source_path", "identity", "sha256", "face", "all_kept")
    carry_columns = CARRIED
    pooled = True

    def output_schema(self) -> pa.Schema:
        return ALIGN_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def setup(self) -> None:
        self.store = align_store(self.context.work_dir)
        self.crops = CropStores(self.context.work_dir, self.config.thumbnail_size)

    def finish(self) -> None:
        align_store(self.context.work_dir).compact()

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.to_pylist()
        size = self.config.crop_size
        job = {}
        for p in photos:
            kps5 = p["face"]["kps5"]
            p["crop_key"] = crop_key(p["sha256"], kps5, size)
            job.setdefault(p["crop_key"], (self.source(p["source_path"]), kps5))
        wanted = {p["crop_key"] for p in photos if p["all_kept"]}
        made = {}  # crops made here of faces in identities `select` keeps whole (stored if they pass below)

        def measure(key: str) -> dict:
            row, crop = align_face(key, *job[key], size, self.config.max_pixels)
            if crop is not None and key in wanted:
                made[key] = crop
            return row

        found, computed = fetch_or_compute(self.store, [p["crop_key"] for p in photos], measure)
        rows = []
        for p in photos:
            crop = found[p["crop_key"]]
            face = p["face"]
            problem = quality_problem(self.config, crop["sharpness"], crop["brightness"])
            if crop["error"] is not None:
                problem = f"no aligned crop could be made ({crop['error']})"
            elif face["yaw"] is None or not face["has_landmarks"] or face["expression"] is None:
                problem = (
                    "no dense landmarks, pose or expression: the face mesh found no face inside the detector's box"
                )
            rows.append(
                {
                    **{k: p[k] for k in ("source_path", "identity", "sha256", "crop_key")},
                    "reason": None if problem is None else RejectReason.LOW_QUALITY.value,
                    "detail": problem,
                    "matrix": crop["matrix"],
                    "crop_sharpness": crop["sharpness"],
                    "crop_brightness": crop["brightness"],
                    COMPUTED: p["crop_key"] in computed,
                }
            )
            computed.discard(p["crop_key"])
        # Faces that pass here in an identity that `select` keeps whole: their crops are stored now, so that `crop`
        # does not make them again.
        sure = [r["crop_key"] for r, p in zip(rows, photos, strict=True) if r["reason"] is None and p["all_kept"]]
        self.crops.put({key: made[key] for key in sure if key in made})
        return pa.Table.from_pylist(rows, schema=self.output_schema())
