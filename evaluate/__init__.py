"""Evaluation: score generated images per person (identity, expression, pose, prompt), compare runs.

from dynamicid.evaluate import FaceScorer, cases_from_sidecars, measure, write_scores
cases = cases_from_sidecars("gen/")
scores = measure(cases, FaceScorer(FaceAnalyzer("auto")))
write_scores(scores, cases, "scores/")
"""

from dynamicid.evaluate.cases import Case, cases_from_manifest, cases_from_sidecars
from dynamicid.evaluate.face_metrics import FaceScorer, match_faces, same_person_similarity
from dynamicid.evaluate.score import Scores, measure, read_scores, write_scores

__all__ = [
    "Case",
    "FaceScorer",
    "Scores",
    "cases_from_manifest",
    "cases_from_sidecars",
    "match_faces",
    "measure",
    "read_scores",
    "same_person_similarity",
    "write_scores",
]
