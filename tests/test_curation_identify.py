"""Which face of each photo is the folder's person (`identify.folder_person`), on the real photos.

Each folder is an identities/ folder with other people's photos salted in (as in test_curation_dataset) and the
group photo of that person; every face of every photo is described by the embedded backend.
"""

import numpy as np
import pytest

from dynamicid.curation.identify import folder_person
from dynamicid.curation.neighbors import cosine_threshold
from dynamicid.faces import FaceAnalyzer, load_image

FOLDERS = {
    "Colin_Powell": ["Junichiro_Koizumi/Junichiro_Koizumi_0001.jpg"],
    "biden": ["Hugo_Chavez/Hugo_Chavez_0001.jpg", "Hugo_Chavez/Hugo_Chavez_0002.jpg", "group:two_people.jpg"],
    "kit_harington": ["Serena_Williams/Serena_Williams_0001.jpg", "group:kit_with_rose.jpg"],
}
GENUINE_OUTLIER = "Colin_Powell/Colin_Powell_0034.jpg"  # a soft, low-contrast LFW crop that matched 2 of 39


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer("embedded")


@pytest.mark.parametrize("identity", FOLDERS)
def test_the_folders_person_is_kept_and_salted_people_are_not(shared_faces, analyzer, identity):
    own = sorted(f"{identity}/{p.name}" for p in (shared_faces / "identities" / identity).iterdir())
    files = own + FOLDERS[identity]
    embeddings = []
    for file in files:
        path = shared_faces / "group_photos" / file[6:] if file.startswith("group:") else shared_faces / "identities"
        image = load_image(path if file.startswith("group:") else path / file)
        embeddings.append(np.stack([face.embedding for face in analyzer.analyze(image)]))
    same_cos = cosine_threshold(analyzer.distance, analyzer.same_person_threshold, analyzer.embedding_dim)
    verdicts = dict(zip(files, folder_person(embeddings, same_cos), strict=True))
    for file, verdict in verdicts.items():
        print(f"{file}: face {verdict.face}, mean similarity to the person's nearest {verdict.similarity:.4f}")
    print(f"needed: {same_cos:.4f}")
    assert all(verdicts[file].face is not None for file in own), identity  # GENUINE_OUTLIER among them
    for file in FOLDERS[identity]:
        if file.startswith("group:"):
            assert verdicts[file].face is not None, file  # checked to be the right face in test_curation_dataset
        else:
            assert verdicts[file].face is None, file
    if identity == "Colin_Powell":
        assert verdicts[GENUINE_OUTLIER].face == 0


def test_detect_describes_the_photos_it_decodes_as_the_describe_stage_would(identity_photos, tmp_path):
    """`detect` describes each photo it decodes (DescribeAhead); `describe` then finds every description in the
    store, under the key it computes, equal to the one it would make by decoding the photo itself."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dynamicid.curation.analysis import describe_photo
    from dynamicid.curation.config import CurationConfig
    from dynamicid.curation.describe_store import STORE_SCHEMA, describe_key, describe_store
    from dynamicid.curation.detect import DetectStage
    from dynamicid.curation.identify import DescribeStage
    from dynamicid.curation.pipeline import open_run, run_stage
    from dynamicid.curation.stages import COMPUTED

    photos = identity_photos("obama", "John_Salley", "orl_s01")
    run = open_run(photos, tmp_path / "out", CurationConfig(face_backend="embedded"), progress=False)
    try:
        run_stage(run, "scan")
    finally:
        run.engine.close()
    scanned = pq.read_table(run.work.table_path("scan"), columns=list(DetectStage.input_columns))
    detect, describe = DetectStage(run.context), DescribeStage(run.context)
    detect.setup()
    detected = detect.process(scanned)
    candidates = detected.filter(pc.is_null(detected.column("reason"))).select(list(DescribeStage.input_columns))
    assert candidates.num_rows >= 0.9 * scanned.num_rows
    describe.setup()
    described = describe.process(candidates)
    assert not any(described.column(COMPUTED).to_pylist())  # all made by detect, none decoded again
    assert described.column("reason").null_count == described.num_rows
    store = describe_store(describe)
    for photo in candidates.to_pylist():
        key = describe_key(photo["sha256"], photo["faces"])
        fresh = describe_photo(detect.analyzer, key, str(photos / photo["source_path"]), photo["faces"])
        _, stored = store.get([key])
        assert stored.to_pylist() == pa.Table.from_pylist([fresh], schema=STORE_SCHEMA).to_pylist(), photo


def test_the_arrow_readers_return_the_stored_descriptions(identity_photos, shared_faces, tmp_path):
    """`face_summaries` (identify) and `face_landmarks` (label) read the describe store without turning the
    landmarks into Python lists; on real photos with several faces they return what the store holds, as
    pyarrow's own `to_pylist` reads it."""
    import shutil

    import pyarrow.parquet as pq

    from dynamicid.curation.config import CurationConfig
    from dynamicid.curation.describe_store import describe_store, face_landmarks, face_summaries
    from dynamicid.curation.identify import DescribeStage
    from dynamicid.curation.pipeline import open_run, run_stage

    photos = identity_photos("obama")
    for name in ("two_people.jpg", "obama_and_biden.jpg", "selfie-many-people.jpg"):
        shutil.copy(shared_faces / "group_photos" / name, photos / "obama" / name)
    run = open_run(photos, tmp_path / "out", CurationConfig(face_backend="embedded"), progress=False)
    try:
        for step in ("scan", "detect", "identify"):
            run_stage(run, step)
    finally:
        run.engine.close()
    described = pq.read_table(run.work.table_path("describe"), columns=["describe_key", "reason"])
    keys = [k for k, r in zip(*described.to_pydict().values(), strict=True) if r is None]
    store = describe_store(DescribeStage(run.context))
    stored = [sorted(faces, key=lambda f: f["face_index"]) for faces in store.get(keys)[1].column("faces").to_pylist()]
    assert max(len(faces) for faces in stored) >= 3  # the group photos' faces are all described

    for faces, summaries in zip(stored, face_summaries(store, keys), strict=True):
        expected = [
            {**{k: v for k, v in f.items() if k != "landmarks"}, "has_landmarks": bool(f["landmarks"])} for f in faces
        ]
        assert summaries == expected

    pairs = [(key, face) for key, faces in zip(keys, stored, strict=True) for face in faces]
    found = face_landmarks(store, [key for key, _ in pairs], [face["face_index"] for _, face in pairs])
    for (key, face), points in zip(pairs, found, strict=True):
        if face["landmarks"]:
            np.testing.assert_array_equal(points, np.asarray(face["landmarks"], np.float32), err_msg=key)
        else:
            assert points is None, key
