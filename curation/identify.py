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

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dynamicid.curation.analysis import FACE_BOX, describe_photos
from dynamicid.curation.backend import analyzer_for
from dynamicid.curation.describe_store import (
    FACE_SUMMARY,
    LOOKUP_ROWS,
    describe_key,
    describe_store,
    face_summaries,
)
from dynamicid.curation.grouping import average_linkage
from dynamicid.curation.imagehash import HASH_VERSION
from dynamicid.curation.stages import COMPUTED, Stage, StageKind, photo_schema
from dynamicid.curation.store import fetch_or_compute_many
from dynamicid.schemas import RejectReason

DESCRIBE_SCHEMA = photo_schema(("describe_key", pa.string()), ("detections", pa.list_(FACE_BOX)))
IDENTIFY_SCHEMA = photo_schema(
    ("face_index", pa.int32()), ("face", FACE_SUMMARY), ("detection", FACE_BOX), ("describe_key", pa.string())
)

CLUSTER_PREFIX = "person_"


class DescribeStage(Stage):
    """Embedding, landmarks, pose, expression and crop hashes of every detected face (into the describe store;
    `detect` has already put there those of the photos it decoded)."""

    name = "describe"
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
        found, computed = fetch_or_compute_many(
            self.store,
            [p["describe_key"] for p in photos],
            lambda keys: describe_photos(self.analyzer, [(k, *job[k], None) for k in keys], self.config.max_pixels),
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

    name = "identify"
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
