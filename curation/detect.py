"""Stage `detect`: decode each distinct photo once and find its faces (boxes, 5 keypoints, scores)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dynamicid.curation.analysis import detect_job
from dynamicid.curation.run import Run, candidates, photo_schema
from dynamicid.schemas import RejectReason

FACE_BOX = pa.struct(
    [("bbox", pa.list_(pa.float32(), 4)), ("kps5", pa.list_(pa.float32(), 10)), ("score", pa.float32())]
)
CACHE_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
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


def detect(run: Run, scan_table: pa.Table) -> pa.Table:
    """Per photo: its size and faces at least `min_face_size` big, or undecodable / no_face / too_small."""
    photos = candidates(scan_table)
    cache = run.work.cache(f"detect-{run.config.face_backend}", CACHE_SCHEMA, "sha256")
    done = cache.load()
    first_path: dict[str, str] = {}
    for photo in photos:
        first_path.setdefault(photo["sha256"], run.source(photo["source_path"]))
    jobs = [(sha, path) for sha, path in first_path.items() if sha not in done]
    run.compute_missing("detect", detect_job, jobs, cache=cache, done=done, key="sha256", distinct=len(first_path))

    rows = []
    for photo in photos:
        found = done[photo["sha256"]]
        row = {**photo, "width": found["width"], "height": found["height"], "faces": []}
        if found["reason"] is not None:
            row["reason"], row["detail"] = found["reason"], found["detail"]
        elif not found["faces"]:
            row["reason"], row["detail"] = RejectReason.NO_FACE.value, "the face detector found no face"
        else:
            big = [f for f in found["faces"] if face_size(f) >= run.config.min_face_size]
            if not big:
                largest = max(face_size(f) for f in found["faces"])
                row["reason"] = RejectReason.TOO_SMALL.value
                row["detail"] = (
                    f"largest face is {largest:.0f} px, below the {run.config.min_face_size:.0f} px minimum "
                    "(--min-face-size)"
                )
            size = (found["width"], found["height"])
            whole = [f for f in big if border_margin(f, *size) >= run.config.min_border_margin]
            if big and not whole:
                margin = max(border_margin(f, *size) for f in big)
                row["reason"] = RejectReason.LOW_QUALITY.value
                row["detail"] = (
                    f"the face is cut off by the image border (keypoints {margin:.2f} eye distances from the "
                    f"side, minimum {run.config.min_border_margin})"
                )
            row["faces"] = whole[: run.config.max_faces_per_photo]
        rows.append(row)
    rows.sort(key=lambda r: r["source_path"])
    return pa.Table.from_pylist([{k: r.get(k) for k in DETECT_SCHEMA.names} for r in rows], schema=DETECT_SCHEMA)
