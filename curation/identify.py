"""Stage `identify`: describe every face, then keep, in each photo, the face of the folder's person.

The folder's person is its dominant embedding cluster: the face that matches faces in the most other photos
of the folder (distance below the analyzer's own `same_person_threshold`) is the anchor, and the faces linked
to it (one per photo) are the person. In each other photo, the face that matches the most of them is kept
when it matches at least half of them and is within the threshold of their mean.
Two faces of one photo are never linked (they are two people). Photos where no face matches are
`other_person`. With `--cluster` the whole folder is grouped instead (see `cluster_identities`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dynamicid.curation.analysis import describe_job
from dynamicid.curation.detect import FACE_BOX
from dynamicid.curation.grouping import average_linkage
from dynamicid.curation.run import Run, candidates, photo_schema
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
        ("phash", pa.int64()),
        ("phash_mirror", pa.int64()),
        ("sharpness", pa.float32()),
        ("backend", pa.string()),
        ("models", pa.string()),
    ]
)
CACHE_SCHEMA = pa.schema([("sha256", pa.string()), ("faces", pa.list_(FACE_DESCRIPTION)), ("detail", pa.string())])
IDENTIFY_SCHEMA = photo_schema(
    ("face_index", pa.int32()), ("faces", pa.list_(FACE_DESCRIPTION)), ("detections", pa.list_(FACE_BOX))
)

CLUSTER_PREFIX = "person_"


def describe_faces(run: Run, detect_table: pa.Table) -> dict[str, dict]:
    """sha256 -> described faces, computing only photos missing from the work folder's cache."""
    photos = candidates(detect_table)
    cache = run.work.cache(f"describe-{run.config.face_backend}", CACHE_SCHEMA, "sha256")
    done = cache.load()
    jobs, seen = [], set()
    for photo in photos:
        sha = photo["sha256"]
        if sha in seen or sha in done:
            seen.add(sha)
            continue
        seen.add(sha)
        jobs.append((sha, run.source(photo["source_path"]), photo["faces"]))
    run.compute_missing("identify", describe_job, jobs, cache=cache, done=done, key="sha256", distinct=len(seen))
    return done


@dataclass(frozen=True)
class Verdict:
    """The folder person's face in one photo (None: not there), and the evidence for the reject message."""

    face: int | None
    matches: int = 0  # the person's faces in other photos that this face matches
    needed: int = 0  # how many it had to match (half of them)


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
    centre = faces[members].mean(axis=0)
    centre /= np.linalg.norm(centre)
    offsets = np.r_[0, np.cumsum([len(e) for e in embeddings])]
    verdicts = []
    for p, e in enumerate(embeddings):
        sims = e @ centre
        if p == photo_of[anchor]:
            verdicts.append(Verdict(anchor - int(offsets[p])))
            continue
        # A face is the person's when it matches at least half of the person's faces in the other photos
        # (a majority vote: one loose match, or a mean pulled by a look-alike, is not enough).
        others = members[photo_of[members] != p]
        links = (e @ faces[others].T >= same_cos).sum(axis=1)
        best = int(np.lexsort((-sims, -links))[0])
        needed = max(1, -(-len(others) // 2))
        keep = bool(links[best] >= needed and sims[best] >= same_cos)
        verdicts.append(Verdict(best if keep else None, int(links[best]), needed))
    return verdicts


def cluster_identities(run: Run, rows: list[dict]) -> dict[str, str]:
    """--cluster: source_path -> 'person_NNNN', average-linkage groups of the largest faces' embeddings.

    A group's faces are, on average, closer to each other than the analyzer's `same_person_threshold` (see
    `grouping`). Identities are numbered by size, then by first source path.
    """
    if not rows:
        return {}
    emb = np.stack([np.asarray(r["faces"][0]["embedding"], np.float32) for r in rows])
    labels = average_linkage(emb, run.same_person_cos)
    sizes = np.bincount(labels)
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))  # labels already follow first source path
    width = max(4, len(str(len(order))))
    name = {c: f"{CLUSTER_PREFIX}{rank + 1:0{width}d}" for rank, c in enumerate(order)}
    return {r["source_path"]: name[int(label)] for r, label in zip(rows, labels, strict=True)}


def identify(run: Run, detect_table: pa.Table) -> pa.Table:
    photos = candidates(detect_table)
    described = describe_faces(run, detect_table)
    rows = []
    for photo in photos:
        desc = described[photo["sha256"]]
        by_index = {f["face_index"]: f for f in desc["faces"]}
        rows.append(
            {
                **{k: photo[k] for k in ("source_path", "identity", "sha256")},
                "faces": [by_index[i] for i in sorted(by_index)],
                "detections": photo["faces"],
                "face_index": None,
                "reason": None if by_index else RejectReason.NO_FACE.value,
                "detail": None if by_index else f"faces were found but none could be described ({desc['detail']})",
            }
        )
    live = [r for r in rows if r["reason"] is None]
    if run.config.cluster:
        names = cluster_identities(run, live)
        for row in live:
            row["identity"], row["face_index"] = names[row["source_path"]], row["faces"][0]["face_index"]
    else:
        by_folder: dict[str, list[dict]] = {}
        for row in live:
            by_folder.setdefault(row["identity"], []).append(row)
        for folder_rows in by_folder.values():
            embeddings = [np.stack([np.asarray(f["embedding"], np.float32) for f in r["faces"]]) for r in folder_rows]
            verdicts = folder_person(embeddings, run.same_person_cos)
            for row, verdict in zip(folder_rows, verdicts, strict=True):
                if verdict.face is None:
                    row["reason"] = RejectReason.OTHER_PERSON.value
                    row["detail"] = (
                        f"none of its {len(row['faces'])} face(s) is the folder's person: the best matches "
                        f"{verdict.matches} of the person's faces in other photos, at least {verdict.needed} needed "
                        f"(distance < {run.analyzer.same_person_threshold:.2f})"
                    )
                else:
                    row["face_index"] = row["faces"][verdict.face]["face_index"]
    return pa.Table.from_pylist([{k: r.get(k) for k in IDENTIFY_SCHEMA.names} for r in rows], schema=IDENTIFY_SCHEMA)
