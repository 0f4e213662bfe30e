"""The describe store: every detected face's description (embedding, landmarks, pose, expression, crop hashes),
keyed by the photo and its faces; `detect` fills it for the photos it decodes (`DescribeAhead`), `describe`
for the rest, and `identify` and `label` read it back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynamicid.curation.analysis import FACE_BOX, describe_photos
from dynamicid.curation.imagehash import HASH_VERSION, HASH_WORDS
from dynamicid.curation.stages import Stage
from dynamicid.curation.store import ResultStore
from dynamicid.curation.tables import digest

LOOKUP_ROWS = 1024  # descriptions read from the store at a time

FACE_DESCRIPTION = pa.struct(
    [
        ("face_index", pa.int32()),
        ("embedding", pa.list_(pa.float32())),
        ("embedding_model", pa.string()),
        ("landmarks", pa.list_(pa.list_(pa.float32(), 2))),  # source pixels; null when the face mesh failed
        ("kps5", pa.list_(pa.float32(), 10)),  # refined by the describer (mesh) where it could
        ("yaw", pa.float32()),
        ("pitch", pa.float32()),
        ("roll", pa.float32()),
        ("expression", pa.string()),
        ("expression_scores", pa.list_(pa.float32(), 7)),
        ("expression_confidence", pa.float32()),
        ("phash", pa.list_(pa.int64(), HASH_WORDS)),  # curation.imagehash: 256 bits of the inner face
        ("phash_mirror", pa.list_(pa.int64(), HASH_WORDS)),
        ("sharpness", pa.float32()),
        ("backend", pa.string()),
        ("models", pa.string()),
    ]
)
# What follows a face through the later stages: its description without the 478 landmarks (those stay in the
# describe store; `label` reads them back), and whether it has them.
FACE_SUMMARY = pa.struct(
    [f for f in FACE_DESCRIPTION if f.name != "landmarks"] + [pa.field("has_landmarks", pa.bool_())]
)
STORE_SCHEMA = pa.schema([("key", pa.string()), ("faces", pa.list_(FACE_DESCRIPTION)), ("detail", pa.string())])


def describe_store(stage: Stage) -> ResultStore:
    return ResultStore(stage.context.work_dir / "stores" / f"describe-{stage.context.backend.digest}", STORE_SCHEMA)


def describe_key(sha256: str, faces: list[dict]) -> str:
    """The photo's bytes, the faces handed to the models (they change with --min-face-size) and the hash's version."""
    return digest(sha256, json.dumps(faces, sort_keys=True), HASH_VERSION)


class DescribeAhead:
    """The describe stage's work on photos the `detect` stage has just decoded, into the describe store.

    The describe stage then finds them there: a photo is decoded once for both (one of three decodes per photo).
    The faces are those `detect` writes to its table, as the describe stage reads them back (float32), so the
    key and the description are the ones it would make.
    The photos of one detect batch are kept decoded until `flush`, which describes them as one model batch.
    """

    def __init__(self, stage: Stage, analyzer):
        self.store = describe_store(stage)
        self.analyzer = analyzer
        self.pending: dict[str, tuple[str, str, list[dict], np.ndarray]] = {}

    def describe(self, sha256: str, path: str, faces: list[dict], image: np.ndarray) -> None:
        """Queue the photo (kept decoded) for `flush`, which describes the batch's photos as one model batch."""
        faces = pa.array(faces, FACE_BOX).to_pylist()
        key = describe_key(sha256, faces)
        if faces and key not in self.pending and self.store.locate([key])[0, 0] < 0:
            self.pending[key] = (key, path, faces, image)

    def flush(self) -> None:
        described = describe_photos(self.analyzer, list(self.pending.values()))
        self.store.put(pa.Table.from_pylist(described, schema=STORE_SCHEMA))
        self.pending.clear()


def _described_lists(store: ResultStore, keys: list[str]) -> Iterator[pa.ListArray]:
    """The `faces` lists of `keys`, in their order, a chunk of the store at a time."""
    for start in range(0, len(keys), LOOKUP_ROWS):
        found, table = store.get(keys[start : start + LOOKUP_ROWS])
        if not found.all():
            raise RuntimeError(f"{store.folder} lost descriptions since `describe` ran; rerun the build")
        yield table.column("faces").combine_chunks()


def face_summaries(store: ResultStore, keys: list[str]) -> Iterator[list[dict]]:
    """Per key, its described faces as `FACE_SUMMARY` dicts, in face-index order.

    The 478 dense landmarks are left in Arrow: as Python lists they were most of identify's cost in the driver.
    """
    for faces in _described_lists(store, keys):
        values = dict(zip(FACE_DESCRIPTION.names, faces.flatten().flatten(), strict=True))
        landmarks = values.pop("landmarks")
        values["has_landmarks"] = pc.fill_null(pc.greater(pc.list_value_length(landmarks), 0), False)
        summaries = pa.StructArray.from_arrays([values[f.name] for f in FACE_SUMMARY], fields=list(FACE_SUMMARY))
        lengths = pc.fill_null(pc.list_value_length(faces), 0).to_numpy()
        offsets = pa.array(np.r_[0, np.cumsum(lengths)], pa.int32())
        for row in pa.ListArray.from_arrays(offsets, summaries).to_pylist():
            yield sorted(row, key=lambda f: f["face_index"])


def face_landmarks(store: ResultStore, keys: list[str], face_indices: list[int]) -> Iterator[np.ndarray | None]:
    """Per key, the (478, 2) source-pixel landmarks of its face `face_indices[i]` (None where the mesh failed)."""
    for start, faces in zip(range(0, len(keys), LOOKUP_ROWS), _described_lists(store, keys), strict=True):
        wanted = np.asarray(face_indices[start : start + LOOKUP_ROWS], np.int64)
        values = dict(zip(FACE_DESCRIPTION.names, faces.flatten().flatten(), strict=True))
        parent = pc.list_parent_indices(faces).to_numpy()
        face_index = values["face_index"].to_numpy(zero_copy_only=False)
        chosen = np.nonzero(face_index == wanted[parent])[0]
        if len(chosen) != len(wanted) or np.any(parent[chosen] != np.arange(len(wanted))):
            raise RuntimeError(f"{store.folder} does not hold the chosen faces of every photo; rerun the build")
        landmarks = values["landmarks"].take(pa.array(chosen))
        lengths = pc.fill_null(pc.list_value_length(landmarks), 0).to_numpy()
        points = landmarks.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 2)
        ends = np.cumsum(lengths)
        for end, length in zip(ends.tolist(), lengths.tolist(), strict=True):
            yield points[end - length : end] if length else None
