"""`dynamicid-eval score` on real photos of ../shared/data/faces, which stand in for generated images.

Expected figures come from the face layer run directly in the tests, never from the evaluate package.
"""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dynamicid.evaluate import Case, FaceScorer, cases_from_manifest, measure, same_person_similarity, write_scores
from dynamicid.evaluate.cli import main
from dynamicid.faces import FaceAnalyzer, load_image
from dynamicid.infer.manifest import ManifestError, ManifestPerson, read_manifest
from dynamicid.schemas.labels import APPROXIMATE_SOURCE_EXPRESSIONS, SOURCE_EXPRESSIONS

# The face layer's measured figure (README, "Face analysis") is its accuracy on the happy, neutral and surprised
# photos of expressions/ (label words mapped by schemas.labels.SOURCE_EXPRESSIONS, approximate ones left out)
SCORED_EXPRESSIONS = ("happy", "neutral", "surprised")


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer("embedded")


@pytest.fixture(scope="module")
def scorer(analyzer):
    return FaceScorer(analyzer)


@pytest.fixture(scope="module")
def pair(shared_faces, analyzer):
    """two_people.jpg (group_photos/labels.csv: obama and biden) and other photos of both from identities/.

    Which face is whose is decided here with the face layer alone: the face nearest each person's references.
    """
    group = shared_faces / "group_photos"
    with open(group / "labels.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["file"] == "two_people.jpg")
    assert row["identities"].startswith("obama;biden")
    references = {
        "obama": [shared_faces / "identities" / "obama" / n for n in ("obama2.jpg", "obama3.jpg")],
        "biden": [shared_faces / "identities" / "biden" / n for n in ("biden2.jpg", "Joseph_Biden_0001.jpg")],
    }
    image = load_image(group / "two_people.jpg")
    faces = analyzer.analyze(image)
    assert len(faces) == 2
    own = {}
    for name, paths in references.items():
        embeddings = [analyzer.analyze(load_image(p))[0].embedding for p in paths]
        distances = [np.mean([analyzer.distance(face.embedding, e) for e in embeddings]) for face in faces]
        own[name] = faces[int(np.argmin(distances))]
        assert min(distances) < analyzer.same_person_threshold
    assert own["obama"] is not own["biden"]
    width = image.width
    halves = {}
    for name, face in own.items():
        centre = (face.bbox[0] + face.bbox[2]) / 2 / width
        halves[name] = (0.0, 0.0, 1.0, 0.5) if centre < 0.5 else (0.0, 0.5, 1.0, 1.0)
    assert halves["obama"] != halves["biden"]
    return {"path": group / "two_people.jpg", "references": references, "faces": own, "halves": halves}


def two_person_case(pair, boxes):
    people = tuple(
        ManifestPerson(tuple(pair["references"][name]), identity=name, box=boxes[name]) for name in ("obama", "biden")
    )
    return Case("pair", pair["path"], "two men", people)


def test_same_person_similarity_is_the_backends_threshold_as_a_cosine(analyzer):
    # the embedded backend: Euclidean distance of unit vectors, d^2 = 2 - 2 cos
    expected = 1 - analyzer.same_person_threshold**2 / 2
    assert same_person_similarity(analyzer) == pytest.approx(expected, abs=1e-6)


def test_each_person_is_matched_to_their_own_face_in_a_group_photo(pair, scorer, analyzer):
    case = two_person_case(pair, pair["halves"])
    records, found = scorer.score(case)
    assert found == 2
    threshold = 1 - analyzer.same_person_threshold**2 / 2
    for record, name in zip(records, ("obama", "biden"), strict=True):
        assert record["identity"] == name and record["face_found"]
        assert record["face_bbox"] == pytest.approx(list(pair["faces"][name].bbox))
        assert record["face_sim"] > threshold and record["same_person"] is True
        assert record["in_box"] is True and record["id_confused"] is False
        assert record["reference_faces"] == 2


def test_swapped_boxes_matches_follow_the_faces_and_both_are_outside_their_box(pair, scorer):
    swapped = {"obama": pair["halves"]["biden"], "biden": pair["halves"]["obama"]}
    case = two_person_case(pair, swapped)
    scores = measure([case], scorer)
    for record, name in zip(scores.per_person, ("obama", "biden"), strict=True):
        assert record["face_bbox"] == pytest.approx(list(pair["faces"][name].bbox))
        assert record["in_box"] is False and record["id_confused"] is False
    assert scores.summary["multi_id"]["in_box"]["mean"] == 0.0
    assert scores.summary["single_id"]["images"] == 0


def test_expression_accuracy_reproduces_the_face_layer(shared_faces, scorer, analyzer):
    folder = shared_faces / "expressions"
    with open(folder / "labels.csv", newline="") as handle:
        rows = [
            (r["file"], SOURCE_EXPRESSIONS[r["expression"]])
            for r in csv.DictReader(handle)
            if r["expression"] not in APPROXIMATE_SOURCE_EXPRESSIONS
        ]
    rows = [(file, label) for file, label in rows if label in SCORED_EXPRESSIONS]
    assert len(rows) >= 50
    # Independently: the face layer's largest face, "no face" counting as wrong
    hits = []
    for file, label in rows:
        faces = analyzer.analyze(load_image(folder / file))
        hits.append(bool(faces) and faces[0].expression == label)
    expected = float(np.mean(hits))
    # Each photo is its own reference, its label the requested expression
    cases = [
        Case(f"e{i:03d}", folder / file, "a face", (ManifestPerson((folder / file,), expression=label),))
        for i, (file, label) in enumerate(rows)
    ]
    scores = measure(cases, scorer)
    assert np.mean([r["expression_ok"] for r in scores.per_person]) == pytest.approx(expected)
    expr = scores.summary["single_id"]["expr"]
    assert expr["mean"] == pytest.approx(expected) and expr["n"] == len(rows)
    assert expr["low"] <= expected <= expr["high"]
    print(
        f"\nexpression accuracy over {len(rows)} labelled photos: {expected:.1%} (interval {expr['low']:.1%}..{expr['high']:.1%})"
    )


def test_a_photo_without_a_face_gives_missing_and_zero_facesim(shared_faces, scorer):
    reference = shared_faces / "identities" / "obama" / "obama2.jpg"
    case = Case(
        "dog", shared_faces / "no_face" / "dog.jpg", "a dog", (ManifestPerson((reference,), expression="happy"),)
    )
    scores = measure([case], scorer)
    (person,) = scores.per_person
    (image,) = scores.per_image
    assert image["missing"] == 1 and image["faces_found"] == 0 and image["extra"] == 0
    assert person["face_found"] is False and person["face_sim"] == 0.0 and person["same_person"] is False
    assert person["expression_ok"] is False and person.get("face_bbox") is None
    assert scores.summary["single_id"]["face_sim"]["mean"] == 0.0


def write_manifest(folder, rows):
    path = folder / "bench.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def test_score_cli_with_a_manifest_writes_every_output(tmp_path, shared_faces, pair):
    images = tmp_path / "images"
    images.mkdir()
    (images / "pair.jpg").write_bytes(pair["path"].read_bytes())
    (images / "dog.png").write_bytes((shared_faces / "no_face" / "obj1__0.png").read_bytes())
    obama = [str(p) for p in pair["references"]["obama"]]
    biden = [str(p) for p in pair["references"]["biden"]]
    manifest = write_manifest(
        tmp_path,
        [
            {
                "id": "pair",
                "prompt": "two men",
                "people": [
                    {
                        "references": obama[:1],
                        "held_out": obama[1:],
                        "identity": "obama",
                        "box": pair["halves"]["obama"],
                    },
                    {"references": biden[:1], "identity": "biden", "box": pair["halves"]["biden"]},
                ],
            },
            {"id": "dog", "prompt": "a toy", "people": [{"references": obama[:1]}]},
        ],
    )
    out = tmp_path / "scores"
    result = CliRunner().invoke(
        main, ["score", str(images), "--manifest", str(manifest), "--out", str(out), "--face-backend", "embedded"]
    )
    assert result.exit_code == 0, result.output
    assert "CLIP-T left out" in result.output
    per_person = pq.read_table(out / "per_person.parquet")
    required = {
        "id",
        "person",
        "face_found",
        "face_sim",
        "in_box",
        "id_confused",
        "expression_ok",
        "pose_ok",
        "face_bbox",
    }
    assert required <= set(per_person.column_names)
    rows = sorted(per_person.to_pylist(), key=lambda r: (r["id"], r["person"]))
    assert [(r["id"], r["person"]) for r in rows] == [("dog", 0), ("pair", 0), ("pair", 1)]
    assert rows[1]["copy_paste"] is not None and rows[2]["copy_paste"] is None
    per_image = pq.read_table(out / "per_image.parquet").to_pylist()
    assert {"id", "faces_found", "people", "clip_t"} <= set(per_image[0]) and per_image[0]["clip_t"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["face_sim"] == "dlib-resnet-128" and summary["models"]["clip_t"] is None
    assert summary["single_id"]["images"] == 1 and summary["multi_id"]["images"] == 1
    assert "clip_t" not in summary["all"] and any("CLIP-T left out" in n for n in summary["notes"])
    report = (out / "report.html").read_text()
    assert report.count("data:image/jpeg;base64,") == 2
    assert report.index("<b>dog</b>") < report.index("<b>pair</b>")  # worst first
    assert not list(out.glob(".dynamicid-*"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"references": ["missing.jpg"]}, "file not found"),
        ({"expression": "sleepy"}, "unknown expression 'sleepy'"),
        ({"box": [0.1, 0.2, 1.5, 0.9]}, "outside [0, 1]"),
        ({"pose": "upside down"}, "unknown pose 'upside down'"),
        ({"held_out": "b.jpg"}, "'held_out' must be a list of file paths"),
        ({"colour": "red"}, "unknown key(s) ['colour']"),
    ],
)
def test_bad_manifest_rows_stop_with_one_line_naming_the_row(tmp_path, shared_faces, change, message):
    reference = str(shared_faces / "identities" / "obama" / "obama2.jpg")
    good = {"id": "ok", "prompt": "p", "people": [{"references": [reference]}]}
    bad = {"id": "bad", "prompt": "p", "people": [{"references": [reference], **change}]}
    manifest = write_manifest(tmp_path, [good, bad])
    result = CliRunner().invoke(
        main, ["score", str(tmp_path), "--manifest", str(manifest), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "line 2 (id 'bad')" in lines[0] and message in lines[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "a b", "prompt": "p"}, "'id' must be a string of letters"),
        ({"id": "s", "prompt": "p", "size": "100x64"}, "'size' '100x64' must be WIDTHxHEIGHT in multiples of 8"),
        ({"id": "s", "prompt": "p", "size": "100000x8"}, "must be WIDTHxHEIGHT in multiples of 8 up to 4096"),
        ({"id": "s", "prompt": "p", "id_scale": float("nan")}, "'id_scale' must be a finite number >= 0, got nan"),
        ({"id": "s", "prompt": "p", "guidance_scale": float("inf")}, "'guidance_scale' must be a finite number"),
        ({"id": "s", "prompt": "", "people": []}, "'prompt' must be a non-empty string"),
        ({"id": "s", "prompt": "p", "people": []}, "'people' must be a non-empty list"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message):
    manifest = write_manifest(tmp_path, [row])
    with pytest.raises(ManifestError, match="line 1") as error:
        read_manifest(manifest)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_duplicate_ids_and_mixed_boxes_are_refused(tmp_path, shared_faces):
    reference = str(shared_faces / "identities" / "obama" / "obama2.jpg")
    row = {"id": "x", "prompt": "p", "people": [{"references": [reference]}]}
    with pytest.raises(ManifestError, match="id 'x' already used on line 1"):
        read_manifest(write_manifest(tmp_path, [row, row]))
    mixed = {**row, "people": [{"references": [reference], "box": [0, 0, 1, 0.5]}, {"references": [reference]}]}
    with pytest.raises(ManifestError, match="to every person or to none"):
        read_manifest(write_manifest(tmp_path, [mixed]))


def test_manifest_image_missing_is_named(tmp_path, shared_faces):
    reference = str(shared_faces / "identities" / "obama" / "obama2.jpg")
    manifest = write_manifest(tmp_path, [{"id": "r1", "prompt": "p", "people": [{"references": [reference]}]}])
    result = CliRunner().invoke(
        main, ["score", str(tmp_path), "--manifest", str(manifest), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2 and "id 'r1'" in result.output and "no image" in result.output


def test_cases_from_manifest_resolve_relative_paths_against_references_dir(tmp_path, shared_faces):
    (tmp_path / "r1.png").write_bytes((shared_faces / "no_face" / "obj1__0.png").read_bytes())
    manifest = write_manifest(tmp_path, [{"id": "r1", "prompt": "p", "people": [{"references": ["obama/obama2.jpg"]}]}])
    (case,) = cases_from_manifest(tmp_path, manifest, shared_faces / "identities")
    assert case.people[0].references == (shared_faces / "identities" / "obama" / "obama2.jpg",)


def test_write_scores_replaces_a_previous_run(tmp_path, shared_faces, scorer):
    reference = shared_faces / "identities" / "obama" / "obama2.jpg"
    case = Case("o", reference, "a man", (ManifestPerson((reference,)),))
    scores = measure([case], scorer)
    for _ in range(2):
        write_scores(scores, [case], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "per_image.parquet",
        "per_person.parquet",
        "report.html",
        "summary.json",
    ]
    (row,) = pq.read_table(tmp_path / "per_person.parquet").to_pylist()
    assert row["face_sim"] == pytest.approx(1.0, abs=1e-5)  # the photo scored against itself


def test_id_confusion_compares_with_the_most_similar_other_person(shared_faces, scorer, analyzer, pair):
    """Three people, two faces: a stranger takes the obama face (biden keeps his), and is confused when some other
    person's references are closer to that face than the stranger's own. Cosines recomputed with numpy here; the
    people are chosen so that the most and the least similar other person disagree."""
    identities = shared_faces / "identities"
    references = {
        "stranger": identities / "Colin_Powell" / "Colin_Powell_0001.jpg",
        "other_stranger": identities / "John_Savage" / "000264_01099001.jpg",
        "biden": identities / "biden" / "Joseph_Biden_0001.jpg",
    }
    people = tuple(ManifestPerson((path,), identity=name) for name, path in references.items())
    records, found = scorer.score(Case("three", pair["path"], "three men", people))
    assert found == 2

    def unit(vector):
        return np.asarray(vector, np.float64) / np.linalg.norm(vector)

    embeddings = {name: unit(analyzer.analyze(load_image(path))[0].embedding) for name, path in references.items()}
    face = pair["faces"]["obama"]
    record = records[0]
    assert record["face_bbox"] == pytest.approx(list(face.bbox))
    cosines = {name: float(e @ unit(face.embedding)) for name, e in embeddings.items()}
    own, others = cosines["stranger"], [cosines["other_stranger"], cosines["biden"]]
    assert min(others) < own < max(others), cosines  # the case tells the most similar from the least similar
    assert record["face_sim"] == pytest.approx(own, abs=1e-6)
    assert record["max_other_sim"] == pytest.approx(max(others), abs=1e-6)
    assert record["id_confused"] is True
    assert records[2]["id_confused"] is False and records[1]["face_found"] is False
