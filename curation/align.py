"""Stage `align`: the FFHQ-style crop with context of the chosen face, its transform, and crop quality."""

from __future__ import annotations

import pyarrow as pa

from dynamicid.curation.analysis import align_job
from dynamicid.curation.dedupe import DEDUPE_SCHEMA
from dynamicid.curation.run import Run, candidates, rejected
from dynamicid.schemas import RejectReason

CACHE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("png", pa.binary()),
        ("matrix", pa.list_(pa.float32(), 6)),
        ("sharpness", pa.float32()),
        ("brightness", pa.float32()),
        ("error", pa.string()),  # why no crop could be made (then the photo is rejected)
    ]
)
ALIGN_SCHEMA = pa.schema(
    [
        *DEDUPE_SCHEMA,
        pa.field("png", pa.binary()),
        pa.field("matrix", pa.list_(pa.float32(), 6)),
        pa.field("crop_sharpness", pa.float32()),
        pa.field("crop_brightness", pa.float32()),
    ]
)


def quality_problem(run: Run, sharp: float, bright: float) -> str | None:
    c = run.config
    if sharp < c.min_sharpness:
        return f"blurred: crop sharpness {sharp:.1f} < {c.min_sharpness}"
    if not c.min_brightness <= bright <= c.max_brightness:
        return f"exposure: crop brightness {bright:.2f} outside [{c.min_brightness}, {c.max_brightness}]"
    return None


def align(run: Run, dedupe_table: pa.Table) -> pa.Table:
    photos = candidates(dedupe_table)
    size = run.config.crop_size
    cache = run.work.cache(f"align-{size}", CACHE_SCHEMA, "key")
    done = cache.load()
    key_of = {p["source_path"]: f"{p['sha256']}:{p['face_index']}" for p in photos}
    # A shard also crops the duplicates it drops: `merge` may drop a copy found in another shard and keep them.
    dropped = [p for p in rejected(dedupe_table) if run.config.shard_count > 1]
    jobs, seen = [], set()
    for p in [*photos, *dropped]:
        key = f"{p['sha256']}:{p['face_index']}"
        if key not in done and key not in seen:
            jobs.append((key, run.source(p["source_path"]), p["face_index"], p["face"]["kps5"], size))
        seen.add(key)
    distinct = len(seen)
    run.compute_missing(
        "align", align_job, jobs, cache=cache, done=done, key="key", distinct=distinct, uses_models=False
    )
    rows = []
    for p in photos:
        crop = done[key_of[p["source_path"]]]
        row = {
            **p,
            "png": crop["png"],
            "matrix": crop["matrix"],
            "crop_sharpness": crop["sharpness"],
            "crop_brightness": crop["brightness"],
        }
        problem = quality_problem(run, crop["sharpness"], crop["brightness"])
        if crop["error"] is not None:
            problem = f"no aligned crop could be made ({crop['error']})"
        elif p["face"]["yaw"] is None or not p["face"]["landmarks"] or p["face"]["expression"] is None:
            problem = "no dense landmarks, pose or expression: the face mesh found no face inside the detector's box"
        if problem is not None:
            row["reason"], row["detail"] = RejectReason.LOW_QUALITY.value, problem
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ALIGN_SCHEMA)
