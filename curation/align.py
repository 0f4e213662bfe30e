"""Stage `align`: the FFHQ-style crop with context of the chosen face: its transform and the crop's quality.

The crop is measured here but not kept: only the faces `select` keeps are cropped again and encoded, by the
`crop` stage (`curation/crop.py`), into the crop store. Both stores are keyed by `crop_key` (the photo's bytes,
the 5 keypoints and the crop size).
"""

from __future__ import annotations

import json

import pyarrow as pa

from dynamicid.curation.analysis import align_face
from dynamicid.curation.config import CurationConfig
from dynamicid.curation.dedupe import CARRIED
from dynamicid.curation.stages import COMPUTED, Stage, photo_schema
from dynamicid.curation.store import ResultStore, fetch_or_compute
from dynamicid.curation.tables import digest
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


def crop_key(sha256: str, kps5: list[float], size: int) -> str:
    """The crop stores' key: the photo's bytes, the 5 keypoints the crop is aligned on, the crop size. It starts
    with the size (`<size>-<digest>`), so the `crop` stage makes the crop at the size `align` measured it."""
    return f"{size}-{digest(sha256, json.dumps(kps5), str(size))}"


def crop_size_of(key: str) -> int:
    return int(key.split("-", 1)[0])


def quality_problem(c: CurationConfig, sharp: float, bright: float) -> str | None:
    if sharp < c.min_sharpness:
        return f"blurred: crop sharpness {sharp:.1f} < {c.min_sharpness}"
    if not c.min_brightness <= bright <= c.max_brightness:
        return f"exposure: crop brightness {bright:.2f} outside [{c.min_brightness}, {c.max_brightness}]"
    return None


class AlignStage(Stage):
    name = step = "align"
    settings = ("crop_size", "min_sharpness", "min_brightness", "max_brightness")
    input_columns = ("source_path", "identity", "sha256", "face")
    carry_columns = CARRIED
    pooled = True

    def output_schema(self) -> pa.Schema:
        return ALIGN_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def setup(self) -> None:
        self.store = align_store(self.context.work_dir)

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
        found, computed = fetch_or_compute(
            self.store, [p["crop_key"] for p in photos], lambda k: align_face(k, *job[k], size)
        )
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
        return pa.Table.from_pylist(rows, schema=self.output_schema())
