"""Calibrated expression labels: the goals on the held-out people of ../shared/data/faces/expressions, the full
confusion matrix over every labelled photo there, the in-the-wild labelled photos of identities/, and the shipped
calibration's provenance (its documented split, and a refit on that part alone reproduces it).

Every labelled photo is analysed once (module fixture). The figures printed here are the ones in BENCHMARKS.md.
"""

from collections import Counter

import numpy as np
import pytest

from dynamicid.faces import FaceAnalyzer, load_image
from dynamicid.faces.expression import ExpressionClassifier
from dynamicid.faces.expression_calibration import LogisticCalibration, mesh_features, shipped_calibration
from dynamicid.faces.expression_fit import Sample, calibrate, measure, read_labels, split_by_person
from dynamicid.schemas.labels import (
    APPROXIMATE_SOURCE_EXPRESSIONS,
    EXPRESSION_CONFIDENCE_LOW,
    EXPRESSIONS,
    SOURCE_EXPRESSIONS,
)

SCORED = ("happy", "neutral", "surprised")
NEGATIVE = ("angry", "sad", "disgusted")
NO_FACE = "no face"


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("embedded")


@pytest.fixture(scope="module")
def labelled(shared_faces, analyzer) -> list[dict]:
    """Each labelled photo: its row of labels.csv, the calibrated label and confidence, and FER's own label."""
    rows = read_labels(shared_faces)
    calibration = {r["file"] for r in split_by_person(rows)[0]}
    classifier = ExpressionClassifier()
    out = []
    for row in rows:
        image = load_image(shared_faces / row["file"])
        faces = analyzer.analyze(image)
        face = faces[0] if faces else None
        fer = classifier.scores(np.asarray(image), face.kps5) if face else None
        out.append(
            {
                **row,
                "folder": row["file"].split("/")[0],
                "truth": SOURCE_EXPRESSIONS[row["expression"]],
                "direct": row["expression"] not in APPROXIMATE_SOURCE_EXPRESSIONS,
                "calibration": row["file"] in calibration,
                "face": face,
                "predicted": face.expression if face else NO_FACE,
                "confidence": face.expression_confidence if face else 0.0,
                "fer": max(fer, key=fer.get) if fer else NO_FACE,
                "fer_scores": fer,
            }
        )
    return out


def samples(items: list[dict]) -> list[Sample]:
    """Fitting samples of the photos with a direct label and a meshed face."""
    return [
        Sample(
            i["file"],
            i["identity"],
            EXPRESSIONS.index(i["truth"]),
            np.array([i["fer_scores"][e] for e in EXPRESSIONS]),
            mesh_features(i["face"].landmarks),
        )
        for i in items
        if i["direct"] and i["face"] is not None and i["face"].landmarks is not None
    ]


def relabelled(items: list[dict], model: LogisticCalibration, key: str) -> list[dict]:
    """`items` (those `samples` keeps) with `key` = the label under `model`."""
    kept = [i for i in items if i["direct"] and i["face"] is not None and i["face"].landmarks is not None]
    fitted = samples(kept)
    features = np.stack([s.features for s in fitted]) if model.weights else None
    probabilities = model.probabilities(np.stack([s.fer for s in fitted]), features)
    return [{**i, key: EXPRESSIONS[int(p.argmax())]} for i, p in zip(kept, probabilities, strict=True)]


def confusion_table(items: list[dict], key: str, rows_by: str = "truth") -> str:
    counts = Counter((item[rows_by], item[key]) for item in items)
    names = sorted({item[rows_by] for item in items}, key=lambda n: (n not in EXPRESSIONS, n))
    columns = [*EXPRESSIONS, NO_FACE]
    lines = ["truth \\ label".ljust(14) + "".join(c[:9].rjust(10) for c in columns) + "     n"]
    for name in names:
        cells = "".join(str(counts[(name, c)] or ".").rjust(10) for c in columns)
        lines.append(name.ljust(14) + cells + str(sum(counts[(name, c)] for c in columns)).rjust(6))
    return "\n".join(lines)


def goal_figures(items: list[dict], key: str) -> dict[str, float]:
    scored = [i for i in items if i["direct"] and i["truth"] in SCORED]
    happy = [i[key] == "happy" for i in scored if i["truth"] == "happy"]
    neutral = [i[key] in NEGATIVE for i in scored if i["truth"] == "neutral"]
    return {
        "accuracy": float(np.mean([i[key] == i["truth"] for i in scored])),
        "happy_recall": float(np.mean(happy)),
        "neutral_as_negative": float(np.mean(neutral)),
        "photos": len(scored),
    }


def describe(figures: dict[str, float]) -> str:
    return (
        f"happy/neutral/surprised accuracy {figures['accuracy']:.1%} over {figures['photos']} photos, "
        f"happy recall {figures['happy_recall']:.1%}, neutral labelled angry/sad/disgusted "
        f"{figures['neutral_as_negative']:.1%}"
    )


def test_the_split_is_by_person_and_the_calibration_names_its_part(labelled):
    provenance = shipped_calibration().provenance
    calibration = [i for i in labelled if i["calibration"]]
    held_out = [i for i in labelled if not i["calibration"]]
    assert {i["identity"] for i in calibration}.isdisjoint(i["identity"] for i in held_out)
    assert sorted({i["identity"] for i in calibration}) == provenance["calibration_people"]
    fitted = {i["file"] for i in calibration if i["direct"] and i["face"] is not None}
    assert set(provenance["calibration_files"]) == fitted
    for part in (calibration, held_out):  # both parts see every source collection and the three scored classes
        assert {i["collection"] for i in part} == {i["collection"] for i in labelled}
        assert {i["folder"] for i in part} == {"expressions", "identities"}
        assert {i["truth"] for i in part if i["folder"] == "expressions"} >= set(SCORED)
    print(f"\ncalibration part: {len(calibration)} photos, held out: {len(held_out)} photos")


def held_out_figures(labelled: list[dict], folder: str) -> tuple[dict, dict]:
    """(calibrated, FER alone) goal figures on the held-out people of `folder`, their confusion matrices printed."""
    held_out = [i for i in labelled if not i["calibration"] and i["folder"] == folder]
    ours, fer = goal_figures(held_out, "predicted"), goal_figures(held_out, "fer")
    print(f"\nexpression labels, held-out people of {folder}/ ({len(held_out)} photos):")
    print(confusion_table(held_out, "predicted") + "\nFER alone, same photos:\n" + confusion_table(held_out, "fer"))
    print(f"calibrated: {describe(ours)}\nFER alone:  {describe(fer)}")
    return ours, fer


def test_goals_on_the_held_out_people(labelled):
    ours, _ = held_out_figures(labelled, "expressions")
    assert ours["photos"] >= 25
    assert ours["accuracy"] >= 0.85
    assert ours["happy_recall"] >= 0.95
    assert ours["neutral_as_negative"] <= 0.10


def test_held_out_people_of_identities_in_the_wild(labelled):
    """LFW photos of identities/ (news photos, crowd-sourced labels; no goal set there): better than FER alone."""
    ours, fer = held_out_figures(labelled, "identities")
    assert ours["photos"] >= 15
    assert ours["accuracy"] >= fer["accuracy"] and ours["neutral_as_negative"] <= fer["neutral_as_negative"]


def test_the_reverse_split_meets_the_goals_too(labelled):
    """Fitted on the held-out people instead, measured on the calibration part: the goals do not hinge on the split."""
    held_out = [i for i in labelled if not i["calibration"]]
    swapped = calibrate(samples(held_out))
    calibration = [i for i in labelled if i["calibration"] and i["folder"] == "expressions"]
    figures = goal_figures(
        relabelled(calibration, LogisticCalibration.from_json(swapped["mesh"]), "swapped"), "swapped"
    )
    print(f"\nreverse split, measured on the calibration part of expressions/: {describe(figures)}")
    assert figures["accuracy"] >= 0.85 and figures["happy_recall"] >= 0.95 and figures["neutral_as_negative"] <= 0.10


def test_fer_only_variant_on_the_held_out_people(labelled):
    """Faces without the 478-point mesh (insightface backend) get the FER-only variant: better than FER alone."""
    people = [i for i in labelled if not i["calibration"] and i["folder"] == "expressions"]
    held_out = relabelled(people, shipped_calibration().fer_only, "fer_only")
    ours, fer = goal_figures(held_out, "fer_only"), goal_figures(held_out, "fer")
    print(f"\nFER-only variant, held-out people of expressions/: {describe(ours)}\nFER alone: {describe(fer)}")
    assert ours["accuracy"] >= fer["accuracy"] and ours["happy_recall"] >= 0.95


def test_confusion_matrix_over_every_labelled_photo(labelled):
    """Every photo of expressions/, all source labels mapped to the 7 classes (schemas.labels.SOURCE_EXPRESSIONS);
    the calibration part included, so not a held-out figure. The thresholds are the FER model's former ones.
    """
    labelled = [i for i in labelled if i["folder"] == "expressions"]
    print("\nexpression labels, every labelled photo (7 classes):\n" + confusion_table(labelled, "predicted"))
    print("by source label:\n" + confusion_table(labelled, "predicted", rows_by="expression"))
    print("FER alone, every labelled photo (7 classes):\n" + confusion_table(labelled, "fer"))
    ours, fer = goal_figures(labelled, "predicted"), goal_figures(labelled, "fer")
    print(f"calibrated: {describe(ours)}\nFER alone:  {describe(fer)}")
    assert len(labelled) == 97 and sum(i["predicted"] != NO_FACE for i in labelled) >= 95
    assert ours["accuracy"] >= 0.70 and ours["happy_recall"] >= 0.90


def test_each_label_has_its_confidence_and_model(labelled):
    faces = [i["face"] for i in labelled if i["face"] is not None]
    version = shipped_calibration().version
    for face in faces:
        assert face.expression_confidence == face.expression_scores[face.expression]
        assert face.expression_confidence == max(face.expression_scores.values())
        assert sum(face.expression_scores.values()) == pytest.approx(1.0, abs=1e-6)
        assert version in face.models["expression"] and "fer2013" in face.models["expression"]
    held_out = [i for i in labelled if not i["calibration"] and i["face"] is not None]
    sure = [i["predicted"] == i["truth"] for i in held_out if i["confidence"] >= EXPRESSION_CONFIDENCE_LOW]
    unsure = [i["predicted"] == i["truth"] for i in held_out if i["confidence"] < EXPRESSION_CONFIDENCE_LOW]
    print(
        f"\nheld out: {len(sure)} sure labels ({np.mean(sure):.0%} right), "
        f"{len(unsure)} unsure below {EXPRESSION_CONFIDENCE_LOW} ({np.mean(unsure):.0%} right)"
    )
    assert sure and unsure and np.mean(sure) > np.mean(unsure)


def test_refitting_on_the_documented_part_reproduces_the_shipped_calibration(shared_faces, analyzer):
    rows = split_by_person(read_labels(shared_faces))[0]
    part = [r for r in rows if r["expression"] not in APPROXIMATE_SOURCE_EXPRESSIONS]
    measured = measure(shared_faces, part, analyzer)
    refit = calibrate(measured)
    shipped = shipped_calibration()
    assert {name: v["regularisation"] for name, v in refit.items()} == shipped.provenance["regularisation"]
    fer = np.stack([s.fer for s in measured if s.features is not None])
    features = np.stack([s.features for s in measured if s.features is not None])
    for name, inputs in (("mesh", (fer, features)), ("fer_only", (fer,))):
        ours = LogisticCalibration.from_json(refit[name]).probabilities(*inputs)
        theirs = getattr(shipped, name).probabilities(*inputs)
        assert np.abs(ours - theirs).max() < 1e-3, name
