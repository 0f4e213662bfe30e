"""Stage `detect`: decode each distinct photo once and find its faces (boxes, 5 keypoints, scores).

The faces it keeps are described right away, on the same decoded photo, into the describe stage's store
(`describe_store.DescribeAhead`): the `describe` stage then finds them there (counted as reused in the run's stats) and
decodes only the photos whose detections came from the store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dynamicid.curation.analysis import FACE_BOX, detect_photo
from dynamicid.curation.backend import analyzer_for
from dynamicid.curation.describe_store import DescribeAhead
from dynamicid.curation.stages import COMPUTED, Stage, photo_schema
from dynamicid.curation.store import ResultStore, fetch_or_compute
from dynamicid.schemas import RejectReason

STORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the photo's sha256
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("faces", pa.list_(FACE_BOX)),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
DETECT_SCHEMA = photo_schema(("width", pa.int32()), ("height", pa.int32()), ("faces", pa.list_(FACE_BOX)))


def face_size(face: dict) -> float:
    """Short side of the face box (source pixels)."""
    x0, y0, x1, y1 = face["bbox"]
    return min(x1 - x0, y1 - y0)


def border_margin(face: dict, width: int, height: int) -> float:
    """Distance from the 5 keypoints to the left/right image border, in eye distances (negative: outside).

    A whole face reaches about one eye distance beyond each eye, so keypoints nearer a side border than
    `min_border_margin` of it mean a face cut off at the side (a half face at the edge of a photo). Top and
    bottom only need the keypoints inside the image: tight portrait crops often cut the chin or the hair.
    """
    kps = np.asarray(face["kps5"], np.float32).reshape(5, 2)
    eye_distance = max(float(np.linalg.norm(kps[1] - kps[0])), 1.0)
    side = min(kps[:, 0].min(), width - kps[:, 0].max()) / eye_distance
    vertical = min(kps[:, 1].min(), height - kps[:, 1].max())
    return float(side) if vertical >= 0 else float(min(side, vertical / eye_distance))


class DetectStage(Stage):
    """Per photo: its size and faces at least `min_face_size` big, or undecodable / no_face / too_small."""

    name = "detect"
    uses_models = pooled = True

    def output_schema(self) -> pa.Schema:
        return DETECT_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def _store(self) -> ResultStore:
        # A photo refused at one --max-pixels may decode at another: the limit is part of what a result depends on.
        limit = "" if self.config.max_pixels is None else f"-px{self.config.max_pixels}"
        return ResultStore(
            self.context.work_dir / "stores" / f"detect-{self.context.backend.digest}{limit}", STORE_SCHEMA
        )

    def setup(self) -> None:
        self.store = self._store()
        self.analyzer = analyzer_for(self.context.backend)
        self.describe = DescribeAhead(self, self.analyzer)

    def finish(self) -> None:
        self._store().compact()

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.to_pylist()
        path_of: dict[str, str] = {}
        for photo in photos:
            path_of.setdefault(photo["sha256"], self.source(photo["source_path"]))

        def detect(sha256: str) -> dict:
            def describe(row: dict, image: np.ndarray) -> None:  # while it is decoded: the faces `describe` gets
                self.describe.describe(sha256, path_of[sha256], self.verdict(row)["faces"], image)

            return detect_photo(self.analyzer, sha256, path_of[sha256], describe, self.config.max_pixels)

        found, computed = fetch_or_compute(self.store, [p["sha256"] for p in photos], detect)
        self.describe.flush()
        rows = []
        for photo in photos:
            row = {**photo, **self.verdict(found[photo["sha256"]]), COMPUTED: photo["sha256"] in computed}
            computed.discard(photo["sha256"])  # a second copy of the same bytes reused the first one's result
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=self.output_schema())

    def verdict(self, found: dict[str, Any]) -> dict[str, Any]:
        """Size, the faces that are big and whole enough, and the reject reason when none is."""
        c = self.config
        row: dict[str, Any] = {"width": found["width"], "height": found["height"], "faces": []}
        if found["reason"] is not None:
            return {**row, "reason": found["reason"], "detail": found["detail"]}
        if not found["faces"]:
            return {**row, "reason": RejectReason.NO_FACE.value, "detail": "the face detector found no face"}
        big = [f for f in found["faces"] if face_size(f) >= c.min_face_size]
        if not big:
            largest = max(face_size(f) for f in found["faces"])
            detail = f"largest face is {largest:.0f} px, below the {c.min_face_size:.0f} px minimum (--min-face-size)"
            return {**row, "reason": RejectReason.TOO_SMALL.value, "detail": detail}
        size = (found["width"], found["height"])
        whole = [f for f in big if border_margin(f, *size) >= c.min_border_margin]
        if not whole:
            margin = max(border_margin(f, *size) for f in big)
            detail = (
                f"the face is cut off by the image border (keypoints {margin:.2f} eye distances from the "
                f"side, minimum {c.min_border_margin})"
            )
            return {**row, "reason": RejectReason.LOW_QUALITY.value, "detail": detail}
        return {**row, "faces": whole[: c.max_faces_per_photo]}
