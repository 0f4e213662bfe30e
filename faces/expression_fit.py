"""Fit the expression calibration (faces/expression_calibration.py) on a documented part of labelled photos.

    python -m dynamicid.faces.expression_fit ../shared/data/faces   # rewrites expression_calibration.json

The labelled photos: each folder of LABELLED_FOLDERS holds `labels.csv` (file, identity, source, and the label
word, a key of `schemas.labels.SOURCE_EXPRESSIONS`, in `expression` or `expression_label`; rows without one are
not labelled). `expressions/` has Yale's posed faces and LFW photos; the LFW photos of `identities/` add
in-the-wild faces (talking, slight smiles) that posed faces lack.
Split by person (`split_by_person`): within each source collection (the repository in `source`), people are
sorted by (their most frequent label word, name) and every second one, starting with the first, is for
calibration; the others are held out, so no person is on both sides. Fitted on the calibration part's photos
with a direct label (not one of APPROXIMATE_SOURCE_EXPRESSIONS): maximum likelihood with an L2 pull towards the
plain FER model (fer_weight 1, the rest 0), its strength chosen by leave-one-person-out log-loss on the
calibration part alone. Mesh weights are fitted for MESH_CLASSES only: the mesh tells those apart, while the four
negative classes have few and noisy labels (LFW's crowd-sourced legend), and weights fitted to them followed the
noise (it gave `angry` a lip-corner-raise weight) and labelled more neutral faces angry. Deterministic.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynamicid.faces.expression_calibration import (
    CALIBRATION_FILE,
    FER_FLOOR,
    MESH_FEATURES,
    LogisticCalibration,
    mesh_features,
)
from dynamicid.schemas.labels import APPROXIMATE_SOURCE_EXPRESSIONS, EXPRESSIONS, SOURCE_EXPRESSIONS

FORMAT = 1
REGULARISATION_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LABELLED_FOLDERS = ("expressions", "identities")
MESH_CLASSES = ("happy", "neutral", "surprised")


def read_labels(root: Path, folders: tuple[str, ...] = LABELLED_FOLDERS) -> list[dict[str, str]]:
    """The labelled rows of `root`/<folder>/labels.csv: `file` relative to `root`, `expression`, `collection`."""
    rows = []
    for folder in folders:
        with open(root / folder / "labels.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                word = row.get("expression") or row.get("expression_label")
                if word:
                    collection = row["source"].split("@")[0]
                    rows.append(
                        {**row, "file": f"{folder}/{row['file']}", "expression": word, "collection": collection}
                    )
    return rows


def split_by_person(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(calibration rows, held-out rows); see the module docstring for the rule."""
    people: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        people.setdefault((row["collection"], row["identity"]), []).append(row["expression"])
    calibration: set[tuple[str, str]] = set()
    for collection in sorted({c for c, _ in people}):
        ranked = sorted(
            (Counter(words).most_common(1)[0][0], person) for (c, person), words in people.items() if c == collection
        )
        calibration |= {(collection, person) for _, person in ranked[0::2]}
    chosen = [(row["collection"], row["identity"]) in calibration for row in rows]
    return [r for r, c in zip(rows, chosen, strict=True) if c], [r for r, c in zip(rows, chosen, strict=True) if not c]


@dataclass
class Sample:
    file: str
    person: str
    label: int  # index in EXPRESSIONS
    fer: np.ndarray  # (7,) FER-2013 probabilities, EXPRESSIONS order
    features: np.ndarray | None  # (5,) MESH_FEATURES, None without a mesh


def measure(root: Path, rows: list[dict[str, str]], analyzer: Any = None) -> list[Sample]:
    """The largest face of each photo: its raw FER scores and mesh features (photos without a face are left out).

    `analyzer`: an embedded FaceAnalyzer to reuse (one is built otherwise).
    """
    from dynamicid.faces import FaceAnalyzer, load_image
    from dynamicid.faces.expression import ExpressionClassifier

    analyzer, classifier = analyzer or FaceAnalyzer("embedded"), ExpressionClassifier()
    samples = []
    for row in rows:
        image = load_image(root / row["file"])
        faces = analyzer.analyze(image)
        if not faces:
            continue
        face = faces[0]
        fer = classifier.scores(np.asarray(image.convert("RGB")), face.kps5)
        samples.append(
            Sample(
                file=row["file"],
                person=row["identity"],
                label=EXPRESSIONS.index(SOURCE_EXPRESSIONS[row["expression"]]),
                fer=np.array([fer[e] for e in EXPRESSIONS]),
                features=None if face.landmarks is None else mesh_features(face.landmarks),
            )
        )
    return samples


def fit(samples: list[Sample], strength: float, *, mesh: bool) -> LogisticCalibration:
    """Maximum likelihood + strength * (squared distance to the plain FER model's parameters)."""
    from scipy.optimize import minimize

    if mesh:
        samples = [s for s in samples if s.features is not None]
    classes, count = len(EXPRESSIONS), len(MESH_FEATURES) if mesh else 0
    log_fer = np.log(np.clip(np.stack([s.fer for s in samples]), FER_FLOOR, 1.0))
    labels = np.array([s.label for s in samples])
    features = np.stack([s.features for s in samples]) if mesh else np.zeros((len(samples), 0))
    mean, scale = features.mean(0), features.std(0) + 1e-6
    standard = (features - mean) / scale
    prior = np.zeros(1 + classes + classes * count)
    prior[0] = 1.0
    free = np.zeros((classes, count))  # 1 where a mesh weight is fitted
    free[[EXPRESSIONS.index(c) for c in MESH_CLASSES]] = 1.0

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weights = theta[1 + classes :].reshape(classes, count) * free
        logits = theta[0] * log_fer + theta[1 : 1 + classes] + standard @ weights.T
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        n = len(labels)
        loss = -np.log(probabilities[np.arange(n), labels]).mean() + strength * ((theta - prior) ** 2).sum()
        error = probabilities.copy()
        error[np.arange(n), labels] -= 1.0
        error /= n
        gradient = np.concatenate([[(error * log_fer).sum()], error.sum(0), ((error.T @ standard) * free).ravel()])
        return loss, gradient + 2 * strength * (theta - prior)

    theta = minimize(objective, prior, jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-9}).x
    weights = theta[1 + classes :].reshape(classes, count) * free
    return LogisticCalibration(
        fer_weight=float(theta[0]),
        bias=tuple(float(b) for b in theta[1 : 1 + classes]),
        weights=tuple(tuple(float(w) for w in row) for row in weights) if mesh else (),
        mean=tuple(float(m) for m in mean) if mesh else (),
        scale=tuple(float(s) for s in scale) if mesh else (),
    )


def person_out_log_loss(samples: list[Sample], strength: float, *, mesh: bool) -> float:
    """Mean log-loss of each person's photos under the model fitted without that person."""
    if mesh:
        samples = [s for s in samples if s.features is not None]
    total = 0.0
    for person in sorted({s.person for s in samples}):
        model = fit([s for s in samples if s.person != person], strength, mesh=mesh)
        mine = [s for s in samples if s.person == person]
        probabilities = model.probabilities(
            np.stack([s.fer for s in mine]), np.stack([s.features for s in mine]) if mesh else None
        )
        total -= np.log(probabilities[np.arange(len(mine)), [s.label for s in mine]]).sum()
    return total / len(samples)


def calibrate(samples: list[Sample]) -> dict:
    """Both variants, each with the regularisation strength that leave-one-person-out chose."""
    result = {}
    for name, mesh in (("mesh", True), ("fer_only", False)):
        strength = min(REGULARISATION_GRID, key=lambda s: person_out_log_loss(samples, s, mesh=mesh))
        result[name] = {**fit(samples, strength, mesh=mesh).to_json(), "regularisation": strength}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help=f"the folder holding {' and '.join(LABELLED_FOLDERS)}")
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE, help="the calibration JSON to write")
    args = parser.parse_args(argv)
    rows = read_labels(args.root)
    calibration_rows, _ = split_by_person(rows)
    direct = [r for r in calibration_rows if r["expression"] not in APPROXIMATE_SOURCE_EXPRESSIONS]
    samples = measure(args.root, direct)
    variants = calibrate(samples)
    document = {
        "format": FORMAT,
        "classes": list(EXPRESSIONS),
        "mesh_features": list(MESH_FEATURES),
        **{name: {k: v for k, v in variant.items() if k != "regularisation"} for name, variant in variants.items()},
        "provenance": {
            "fitted_by": "python -m dynamicid.faces.expression_fit ../shared/data/faces (faces/expression_fit.py)",
            "photos": f"labelled photos of {', '.join(LABELLED_FOLDERS)} in ../shared/data/faces (test photos, set A)",
            "split": "faces.expression_fit.split_by_person; the other labelled people are held out",
            "mesh_classes": list(MESH_CLASSES),
            "regularisation": {name: variant["regularisation"] for name, variant in variants.items()},
            "calibration_people": sorted({r["identity"] for r in calibration_rows}),
            "calibration_files": sorted(s.file for s in samples),
        },
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}: fitted on {len(samples)} photos of {len(document['provenance']['calibration_people'])}")


if __name__ == "__main__":
    main()
