"""Stage `identify`: describe every face, then keep, in each photo, the face of the folder's person.

The folder's person is its dominant embedding cluster: the face that matches faces in the most other photos
of the folder (distance below the analyzer's own `same_person_threshold`) is the anchor, and the faces linked
to it (one per photo) are the person. In each other photo, the face most like its `NEAREST` most similar faces
of the person is kept when their mean similarity is within the threshold: the same evidence in a folder of 4
photos or of 400. (A majority vote, "matches half of the person's faces", asked 20 matches in a folder of 40:
identities/Colin_Powell/Colin_Powell_0034.jpg, a soft, low-contrast LFW crop, matches only its 2 nearest
Powell photos, at 0.427 and 0.436, and was lost; see BENCHMARKS.md for what each rule keeps and rejects.)
Two faces of one photo are never linked (they are two people). Photos where no face matches are
`other_person`. With `--cluster` the whole folder is grouped instead (see `cluster_names`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dynamicid.curation.analysis import describe_photo
from dynamicid.curation.backend import analyzer_for
from dynamicid.curation.detect import FACE_BOX
from dynamicid.curation.grouping import average_linkage
from dynamicid.curation.imagehash import HASH_VERSION, HASH_WORDS
from dynamicid.curation.stages import COMPUTED, Stage, StageKind, photo_schema
from dynamicid.curation.store import ResultStore, fetch_or_compute
from dynamicid.curation.tables import digest
from dynamicid.schemas import RejectReason

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
DESCRIBE_SCHEMA = photo_schema(("describe_key", pa.string()), ("detections", pa.list_(FACE_BOX)))
IDENTIFY_SCHEMA = photo_schema(
    ("face_index", pa.int32()), ("face", FACE_SUMMARY), ("detection", FACE_BOX), ("describe_key", pa.string())
)

CLUSTER_PREFIX = "person_"
LOOKUP_ROWS = 1024  # descriptions read from the store at a time


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
    """

    def __init__(self, stage: Stage, analyzer):
        self.store = describe_store(stage)
        self.analyzer = analyzer
        self.described: dict[str, dict] = {}

    def describe(self, sha256: str, path: str, faces: list[dict], image: np.ndarray) -> None:
        faces = pa.array(faces, FACE_BOX).to_pylist()
        key = describe_key(sha256, faces)
        if faces and key not in self.described and self.store.locate([key])[0, 0] < 0:
            self.described[key] = describe_photo(self.analyzer, key, path, faces, image)

    def flush(self) -> None:
        self.store.put(pa.Table.from_pylist(list(self.described.values()), schema=STORE_SCHEMA))
        self.described.clear()


class DescribeStage(Stage):
    """Embedding, landmarks, pose, expression and crop hashes of every detected face (into the describe store;
    `detect` has already put there those of the photos it decoded)."""

    name = "describe"
    step = "identify"
    version = HASH_VERSION  # the faces' hashes are part of its output
    input_columns = ("source_path", "identity", "sha256", "faces")
    uses_models = pooled = True

    def output_schema(self) -> pa.Schema:
        return DESCRIBE_SCHEMA.append(pa.field(COMPUTED, pa.bool_()))

    def setup(self) -> None:
        self.store = describe_store(self)
        self.analyzer = analyzer_for(self.context.backend)

    def finish(self) -> None:
        describe_store(self).compact()

    def process(self, batch: pa.Table) -> pa.Table:
        photos = batch.to_pylist()
        job = {}
        for photo in photos:
            photo["describe_key"] = describe_key(photo["sha256"], photo["faces"])
            job.setdefault(photo["describe_key"], (self.source(photo["source_path"]), photo["faces"]))
        found, computed = fetch_or_compute(
            self.store, [p["describe_key"] for p in photos], lambda k: describe_photo(self.analyzer, k, *job[k])
        )
        rows = []
        for photo in photos:
            described = found[photo["describe_key"]]
            rows.append(
                {
                    **{k: photo[k] for k in ("source_path", "identity", "sha256", "describe_key")},
                    "detections": photo["faces"],
                    "reason": None if described["faces"] else RejectReason.NO_FACE.value,
                    "detail": None
                    if described["faces"]
                    else f"faces were found but none could be described ({described['detail']})",
                    COMPUTED: photo["describe_key"] in computed,
                }
            )
            computed.discard(photo["describe_key"])
        return pa.Table.from_pylist(rows, schema=self.output_schema())


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


NEAREST = 3  # a face is compared with this many of the person's faces: its most similar ones


@dataclass(frozen=True)
class Verdict:
    """The folder person's face in one photo (None: not there), and the evidence for the reject message."""

    face: int | None
    similarity: float = 1.0  # the best face's mean cosine similarity to its NEAREST most similar person's faces


def folder_person(embeddings: list[np.ndarray], same_cos: float) -> list[Verdict]:
    """For each photo (a list of face embeddings), which face is the folder's person.

    Cost is quadratic in the faces of ONE folder (one identity), computed in blocks.
    """
    photo_of = np.concatenate([np.full(len(e), p) for p, e in enumerate(embeddings)]).astype(np.int64)
    faces = np.concatenate([e for e in embeddings if len(e)]).astype(np.float32)
    n, photos = len(faces), len(embeddings)
    if photos == 1:
        return [Verdict(0)]
    # support[i]: how many OTHER photos hold a face matching face i.
    support = np.zeros(n, np.int64)
    for start in range(0, n, 1024):
        sims = faces[start : start + 1024] @ faces.T
        linked = sims >= same_cos
        hits = np.zeros((len(sims), photos), bool)
        rows, cols = np.nonzero(linked)
        hits[rows, photo_of[cols]] = True
        hits[np.arange(len(sims)), photo_of[start : start + 1024]] = False
        support[start : start + 1024] = hits.sum(axis=1)
    first_in_photo = np.r_[True, photo_of[1:] != photo_of[:-1]]  # the largest face of each photo
    anchor = int(np.lexsort((np.arange(n), ~first_in_photo, -support))[0])
    if support[anchor] == 0:
        # No two photos agree on anybody: the folder's person cannot be told apart; keep each largest face.
        return [Verdict(0)] * photos
    # The person's faces: in each photo, the face most like the anchor, if it is linked to the anchor.
    to_anchor = faces @ faces[anchor]
    member_of_photo: dict[int, int] = {}
    for i in np.argsort(-to_anchor, kind="stable"):
        if to_anchor[i] >= same_cos and int(photo_of[i]) not in member_of_photo:
            member_of_photo[int(photo_of[i])] = int(i)
    members = np.array(sorted(member_of_photo.values()))
    offsets = np.r_[0, np.cumsum([len(e) for e in embeddings])]
    verdicts = []
    for p, e in enumerate(embeddings):
        if p == photo_of[anchor]:
            verdicts.append(Verdict(anchor - int(offsets[p])))
            continue
        # The face whose NEAREST most similar faces of the person (in other photos) are, on average, within the
        # threshold: one loose match is not enough, and a genuine but unusual photo needs no majority.
        others = members[photo_of[members] != p]
        similar = -np.sort(-(e @ faces[others].T), axis=1)[:, :NEAREST].mean(axis=1)
        best = int(np.argmax(similar))
        verdicts.append(Verdict(best if similar[best] >= same_cos else None, float(similar[best])))
    return verdicts


def cluster_names(embeddings: np.ndarray, same_cos: float) -> list[str]:
    """--cluster: 'person_NNNN' per photo, average-linkage groups of the largest faces' embeddings.

    A group's faces are, on average, closer to each other than the analyzer's `same_person_threshold` (see
    `grouping`). Identities are numbered by size, then by first source path.
    """
    if not len(embeddings):
        return []
    labels = average_linkage(embeddings, same_cos)
    sizes = np.bincount(labels)
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))  # labels already follow first source path
    width = max(4, len(str(len(order))))
    name = {c: f"{CLUSTER_PREFIX}{rank + 1:0{width}d}" for rank, c in enumerate(order)}
    return [name[int(label)] for label in labels]


class IdentifyStage(Stage):
    """In each photo, the face of the folder's person (GROUP), or with --cluster the largest face (GLOBAL)."""

    name = step = "identify"
    settings = ("cluster",)
    input_columns = ("source_path", "identity", "sha256", "describe_key", "detections")

    def __init__(self, context):
        super().__init__(context)
        self.kind = StageKind.GLOBAL if self.config.cluster else StageKind.GROUP

    def output_schema(self) -> pa.Schema:
        return IDENTIFY_SCHEMA

    def setup(self) -> None:
        self.store = describe_store(self)

    def process(self, batch: pa.Table) -> pa.Table:
        if self.config.cluster:
            return self._cluster(batch)
        rows = batch.to_pylist()
        faces = list(face_summaries(self.store, [r["describe_key"] for r in rows]))
        embeddings = [np.stack([np.asarray(f["embedding"], np.float32) for f in fs]) for fs in faces]
        same_cos = self.context.backend.same_person_cos
        for row, photo_faces, verdict in zip(rows, faces, folder_person(embeddings, same_cos), strict=True):
            if verdict.face is None:
                row["reason"] = RejectReason.OTHER_PERSON.value
                row["detail"] = (
                    f"none of its {len(photo_faces)} face(s) is the folder's person: the closest has mean cosine "
                    f"similarity {verdict.similarity:.3f} to its {NEAREST} most similar faces of the person in "
                    f"other photos, at least {same_cos:.3f} needed "
                    f"(distance < {self.context.backend.same_person_threshold:.2f})"
                )
            else:
                self._choose(row, photo_faces[verdict.face])
        return pa.Table.from_pylist(rows, schema=IDENTIFY_SCHEMA)

    @staticmethod
    def _choose(row: dict, face: dict) -> None:
        row["face_index"] = face["face_index"]
        row["face"] = face
        row["detection"] = row["detections"][face["face_index"]]

    def _cluster(self, batch: pa.Table) -> pa.Table:
        """Every photo's largest described face, a chunk at a time; then one clustering of their embeddings."""
        chunks, embeddings = [], []
        for start in range(0, batch.num_rows, LOOKUP_ROWS):
            rows = batch.slice(start, LOOKUP_ROWS).to_pylist()
            for row, faces in zip(rows, face_summaries(self.store, [r["describe_key"] for r in rows]), strict=True):
                self._choose(row, faces[0])
            embeddings.append(np.stack([np.asarray(r["face"]["embedding"], np.float32) for r in rows]))
            chunks.append(pa.Table.from_pylist(rows, schema=IDENTIFY_SCHEMA))
        table = pa.concat_tables(chunks) if chunks else IDENTIFY_SCHEMA.empty_table()
        names = cluster_names(
            np.concatenate(embeddings) if embeddings else np.zeros((0, 1)), self.context.backend.same_person_cos
        )
        return table.set_column(1, "identity", pa.array(names, pa.string()))
