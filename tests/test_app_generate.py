"""The Generate tab's request handler without a browser: tiny-random FAKE base, random FAKE weights, real photos."""

import json
from pathlib import Path

import pytest

from dynamicid.app.generate_tab import MAX_PEOPLE, GenerateTab
from dynamicid.app.layout_canvas import layout_value
from dynamicid.faces import FaceAnalyzer
from dynamicid.infer import ModelOptions, load_pipeline
from dynamicid.models.base import load_base_model
from dynamicid.testing import random_parts, save_random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    parts = random_parts(load_base_model("tiny-random"), FaceAnalyzer("embedded"))
    weights = save_random_weights(parts, tmp_path_factory.mktemp("tab-weights") / "w.safetensors")
    output_dir = tmp_path_factory.mktemp("tab-outputs")
    options = ModelOptions("tiny-random", [weights], face_backend="embedded", device="cpu")
    return GenerateTab(load_pipeline(options), output_dir)


@pytest.fixture(scope="module")
def photos(shared_faces):
    names = ("identities/obama/obama.jpg", "identities/biden/biden.jpg", "group_photos/obama_and_biden.jpg")
    return dict(zip(("obama", "biden", "group"), (str(shared_faces / name) for name in names), strict=True))


def request(people, boxes=None, seed=7, random_seed=False, size=(64, 64)):
    """The values the page sends: settings, then (reference, expression, pose, landmark) for each of 4 slots."""
    layout = layout_value(*size, len(people), boxes)
    values = [len(people), layout, "a portrait", "", seed, random_seed, 2, 5.0, 1.0, *size]
    slots = [*people, *[(None, "keep", "keep", None)] * (MAX_PEOPLE - len(people))]
    return values + [v for slot in slots for v in slot]


def test_landmark_image_pose_and_keep_reach_the_sidecar(tab, photos):
    people = [(photos["obama"], "keep", "front view", photos["biden"]), (photos["biden"], "sad", "keep", None)]
    status, image, maps, sidecar_path, seed = tab.generate(*request(people))
    assert status.startswith("Done: seed 7, 64x64, 2 steps"), status
    sidecar = json.loads(Path(sidecar_path).read_text())
    first, second = sidecar["people"]
    requested = {"expression": None, "pose": "front view", "landmark_image": photos["biden"], "box": [0, 0, 1, 0.5]}
    assert first["requested"] == requested
    assert first["target_pose"] == "front view" and first["landmark_image"] == photos["biden"]
    assert second["target_expression"] == "sad" and second["landmark_image"] is None
    assert image == sidecar["outputs"]["images"][0] and [m[1] for m in maps] == ["person 1", "person 2"]
    assert seed == 7


def test_random_seed_is_returned_and_several_faces_warn(tab, photos):
    people = [(photos["group"], "happy", "keep", None)]
    status, _, _, sidecar_path, seed = tab.generate(*request(people, seed=None, random_seed=True))
    sidecar = json.loads(Path(sidecar_path).read_text())
    assert seed == sidecar["settings"]["seed"] and f"seed {seed}," in status
    assert sidecar["people"][0]["reference"]["faces_found"] > 1
    assert "**warning:**" in status and "faces in reference of person 1" in status


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty-box", "box of person 2 (0.0, 0.5, 0.0, 1.0) is empty"),
        ("no-photo", "person 2 has no reference photo: upload one"),
        ("size", "size 60x64: width and height must be multiples of 8 in 8..4096"),
    ],
)
def test_bad_requests_answer_one_line_and_write_nothing(tab, photos, case, message):
    people = [(photos["obama"], "keep", "keep", None), (photos["biden"], "keep", "keep", None)]
    boxes, size = None, (64, 64)
    if case == "empty-box":
        boxes = [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 0.0, 1.0]]
    if case == "no-photo":
        people[1] = (None, "keep", "keep", None)
    if case == "size":
        size = (60, 64)
    before = sorted(tab.output_dir.iterdir())
    status, image, maps, sidecar, _ = tab.generate(*request(people, boxes, size=size))
    assert status.startswith("**error:** ") and message in status and "\n" not in status, status
    assert (image, maps, sidecar) == (None, None, None)
    assert sorted(tab.output_dir.iterdir()) == before


def test_the_tab_runs_on_a_flux_base_and_says_flux_sizes(tmp_path, photos):
    """`dynamicid-app --base-model` a Flux folder: the same tab over DynamicIDFluxPipeline (tiny-random-flux)."""
    parts = random_parts(load_base_model("tiny-random-flux"), FaceAnalyzer("embedded"))
    weights = save_random_weights(parts, tmp_path / "flux.safetensors")
    options = ModelOptions("tiny-random-flux", [weights], face_backend="embedded", device="cpu")
    pipe = load_pipeline(options)
    assert type(pipe).__name__ == "DynamicIDFluxPipeline"
    tab = GenerateTab(pipe, tmp_path)
    people = [(photos["obama"], "happy", "keep", None), (photos["biden"], "surprised", "keep", None)]
    status, image, _, sidecar_path, _ = tab.generate(*request(people, size=(64, 32)))
    assert status.startswith("Done: seed 7, 64x32, 2 steps"), status
    sidecar = json.loads(Path(sidecar_path).read_text())
    assert [p["target_expression"] for p in sidecar["people"]] == ["happy", "surprised"]
    assert (tab.native, tab.step) == (pipe.default_sample_size * 8, 16)  # FluxPipeline's 1024, 2x2 patches of 8
    status, image, *_ = tab.generate(*request(people, size=(72, 32)))
    assert image is None and status.startswith("**error:**") and "divisible by 16" in status, status
