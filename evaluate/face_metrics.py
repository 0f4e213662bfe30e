"""Per-person face figures of one image: who is where (Hungarian matching), FaceSim, box, ID confusion,
copy-paste, expression and pose.

Similarities are cosines of L2-normalised embeddings of the face backend (ArcFace with insightface, as the
paper's FaceSim; dlib's ResNet with the embedded backend), so figures from different backends do not compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from dynamicid.evaluate.cases import Case
from dynamicid.faces import Face, FaceAnalyzer, load_image
from dynamicid.infer.manifest import ManifestPerson


def same_person_similarity(analyzer: FaceAnalyzer) -> float:
    """The cosine at which the backend's own distance reaches its same-person threshold.

    Both backends' distances are monotone in the cosine of unit vectors (Euclidean: sqrt(2 - 2 cos); cosine
    distance: 1 - cos), so bisection on a pair of unit vectors finds it without knowing the metric.
    """
    low, high = -1.0, 1.0
    for _ in range(60):
        cosine = (low + high) / 2
        pair = np.array([[1.0, 0.0], [cosine, np.sqrt(1.0 - cosine**2)]], dtype=np.float64)
        if analyzer.distance(pair[0], pair[1]) < analyzer.same_person_threshold:
            high = cosine
        else:
            low = cosine
    return float(high)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


@dataclass
class Identity:
    """What the references of one person give: the mean embedding, the first reference's face, held-out ones."""

    embedding: np.ndarray | None  # unit vector; None when no reference shows a face
    reference_faces: int
    first_face: Face | None
    held_out: list[np.ndarray]


class FaceScorer:
    """Scores images with one face analyzer; reference, held-out and landmark photos are analysed once."""

    def __init__(self, analyzer: FaceAnalyzer):
        self.analyzer = analyzer
        self.threshold_similarity = same_person_similarity(analyzer)
        self._photos: dict[Path, tuple[list[Face], tuple[int, int]]] = {}

    def models(self) -> dict[str, str]:
        """Which model produced each figure (from the face records of the backend)."""
        probe = next((faces[0] for faces, _ in self._photos.values() if faces), None)
        models = dict(probe.models) if probe is not None else {}
        return {
            "face_backend": self.analyzer.backend,
            "face_sim": self.analyzer.embedding_model,
            "detector": models.get("bbox", ""),
            "expression": models.get("expression", ""),
            "pose": models.get("pose", ""),
            "same_person_similarity": round(self.threshold_similarity, 4),
        }

    def faces(self, path: Path, keep: bool = True) -> tuple[list[Face], tuple[int, int]]:
        """Every described face of a photo (largest first) and its size; kept photos are analysed once."""
        if path in self._photos:
            return self._photos[path]
        image = load_image(path)
        found = ([f for f in self.analyzer.analyze(image) if f.embedding is not None], image.size)
        if keep:
            self._photos[path] = found
        return found

    def largest_face(self, path: Path) -> Face | None:
        faces, _ = self.faces(path)
        return faces[0] if faces else None

    def identity(self, person: ManifestPerson) -> Identity:
        faces = [self.largest_face(p) for p in person.references]
        embeddings = [_unit(f.embedding) for f in faces if f is not None and f.embedding is not None]
        held = [self.largest_face(p) for p in person.held_out]
        return Identity(
            _unit(np.mean(embeddings, axis=0)) if embeddings else None,
            len(embeddings),
            faces[0],
            [_unit(f.embedding) for f in held if f is not None and f.embedding is not None],
        )

    def score(self, case: Case) -> tuple[list[dict[str, Any]], int]:
        """One record per person (`schemas.evaluation.PER_PERSON_COLUMNS` less id and image) and the face count."""
        identities = [self.identity(p) for p in case.people]  # reference photos are kept, scored images not
        faces, size = self.faces(case.image, keep=False)
        assigned = match_faces(identities, faces)
        records = []
        for index, (person, identity) in enumerate(zip(case.people, identities, strict=True)):
            face = faces[assigned[index]] if index in assigned else None
            records.append(self._person_record(index, person, identity, identities, face, size))
        return records, len(faces)

    def _person_record(
        self,
        index: int,
        person: ManifestPerson,
        identity: Identity,
        identities: list[Identity],
        face: Face | None,
        size: tuple[int, int],
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "person": index,
            "identity": person.identity,
            "people": len(identities),
            "reference_faces": identity.reference_faces,
            "face_found": face is not None,
            "face_sim": 0.0,
            "same_person": False,
            "expression_requested": person.expression,
            "pose_requested": person.pose,
            # requested but no face: the request was not met
            "expression_ok": None if person.expression is None else False,
            "pose_ok": None if person.pose is None else False,
        }
        if face is None:
            return record
        embedding = _unit(face.embedding)
        similarity = _cosine(identity.embedding, embedding)
        others = [_cosine(other.embedding, embedding) for i, other in enumerate(identities) if i != index]
        others = [s for s in others if s is not None]
        record |= {
            "face_sim": similarity if similarity is not None else 0.0,
            "same_person": similarity is not None and similarity >= self.threshold_similarity,
            "face_bbox": [float(v) for v in face.bbox],
            "in_box": None if person.box is None else _centre_in_box(face.bbox, person.box, size),
            "max_other_sim": max(others) if others else None,
            "id_confused": (max(others) > (similarity or -1.0)) if others else None,
            "expression_found": face.expression,
            "pose_found": face.pose_bin,
        }
        if identity.held_out and similarity is not None:
            record["copy_paste"] = similarity - float(np.mean([embedding @ h for h in identity.held_out]))
        if person.expression is not None:
            record["expression_ok"] = face.expression == person.expression
        if identity.first_face is not None and face.expression is not None:
            record["expression_changed"] = face.expression != identity.first_face.expression
        if person.pose is not None:
            record["pose_ok"] = face.pose_bin == person.pose
        if person.landmark_image is not None:
            target = self.largest_face(person.landmark_image)
            if target is not None and None not in (target.yaw, target.pitch, face.yaw, face.pitch):
                record["yaw_error"] = abs(face.yaw - target.yaw)
                record["pitch_error"] = abs(face.pitch - target.pitch)
        return record


def match_faces(identities: list[Identity], faces: list[Face]) -> dict[int, int]:
    """person index -> face index, maximising the summed similarity (scipy's Hungarian solver).

    A person without a reference face can still take a face no one else wants (lowest similarity).
    """
    if not identities or not faces:
        return {}
    similarity = np.full((len(identities), len(faces)), -2.0)
    for i, identity in enumerate(identities):
        if identity.embedding is not None:
            similarity[i] = [identity.embedding @ _unit(face.embedding) for face in faces]
    rows, columns = linear_sum_assignment(similarity, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, columns, strict=True)}


def _cosine(reference: np.ndarray | None, embedding: np.ndarray) -> float | None:
    return None if reference is None else float(reference @ embedding)


def _centre_in_box(bbox: tuple[float, ...], box: tuple[float, ...], size: tuple[int, int]) -> bool:
    """Whether the face box's centre (pixels) lies in the person's (y0, x0, y1, x1) box (fractions)."""
    width, height = size
    x = (bbox[0] + bbox[2]) / 2 / width
    y = (bbox[1] + bbox[3]) / 2 / height
    y0, x0, y1, x1 = box
    return bool(y0 <= y <= y1 and x0 <= x <= x1)
