"""`dynamicid-infer generate` end to end: tiny-random FAKE base, random FAKE weights, real reference photos."""

import hashlib
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dynamicid.faces import FaceAnalyzer
from dynamicid.infer.cli import main
from dynamicid.models import FaceEncoder
from dynamicid.models.base import load_base_model
from dynamicid.models.checkpoints import save_dynamicid
from dynamicid.schemas import CheckpointMetadata
from dynamicid.testing import random_parts, save_random_weights, save_release_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    analyzer = FaceAnalyzer("embedded")
    base = load_base_model("tiny-random")
    parts = random_parts(base, analyzer)
    folder = tmp_path_factory.mktemp("cli-weights")
    other_base = folder / "sd15-face-encoder.safetensors"
    save_dynamicid(
        other_base,
        metadata=CheckpointMetadata(cross_attention_dim=768, id_embed_dim=analyzer.embedding_dim, clip_embed_dim=48),
        face_encoder=FaceEncoder(
            cross_attention_dim=768, id_embeddings_dim=analyzer.embedding_dim, clip_embeddings_dim=48
        ),
    )
    return {
        "ours": save_random_weights(parts, folder / "dynamicid.safetensors"),
        "release": save_release_layout(parts, folder / "release"),
        "other_base": other_base,
    }


@pytest.fixture(scope="module")
def refs(shared_faces):
    return {
        "obama": str(shared_faces / "identities" / "obama" / "obama.jpg"),
        "biden": str(shared_faces / "identities" / "biden" / "biden.jpg"),
        "dog": str(shared_faces / "no_face" / "dog.jpg"),
        "broken": str(shared_faces / "broken" / "text_file_named.png"),
    }


def run(args, weights_args, base_model="tiny-random"):
    return CliRunner().invoke(
        main,
        ["generate", "--base-model", base_model, *weights_args, "--steps", "2", "--face-backend", "embedded", *args],
    )


def two_people(refs, *extra):
    return [
        "--prompt",
        "two friends laughing in a cafe",
        "--person",
        refs["obama"],
        "--expression",
        "happy",
        "--box",
        "0.1,0.05,0.9,0.45",
        "--person",
        refs["biden"],
        "--expression",
        "surprised",
        "--box",
        "0.1,0.55,0.9,0.95",
        *extra,
    ]


def test_two_people_non_square_with_maps_and_sidecar(tmp_path, weights, refs):
    out = tmp_path / "friends.png"
    result = run(
        two_people(
            refs,
            "--size",
            "96x64",
            "--seed",
            "2025",
            "--num-images",
            "2",
            "--activation-maps",
            "--out",
            str(out),
            "--json",
        ),
        ["--weights", str(weights["ours"])],
    )
    assert result.exit_code == 0, result.output
    sidecar = json.loads(result.stdout)
    assert sidecar == json.loads((tmp_path / "friends.json").read_text())
    images = [tmp_path / "friends-0.png", tmp_path / "friends-1.png"]
    assert sidecar["outputs"]["images"] == [str(p) for p in images]
    for path in images:
        assert Image.open(path).size == (96, 64)
    maps = sorted(tmp_path.glob("*.saa.png"))
    assert len(maps) == 4 and all(Image.open(p).size == (96, 64) for p in maps)

    settings = sidecar["settings"]
    assert settings["seed"] == 2025 and settings["steps"] == 2 and settings["guidance_scale"] == 5.0
    assert (settings["width"], settings["height"], settings["num_images"]) == (96, 64, 2)
    assert settings["prompt"] == "two friends laughing in a cafe" and settings["scheduler"] == "DDIMScheduler"
    assert settings["saa"] == {
        "num_ids": 2,
        "id_scale": 1.0,
        "gating": True,
        "boxes": [[0.1, 0.05, 0.9, 0.45], [0.1, 0.55, 0.9, 0.95]],
        "boost": 2.0,
        "boost_steps": 12,
    }
    files = sidecar["models"]["files"]
    assert files["weights"]["path"] == str(weights["ours"])
    assert files["weights"]["sha256"] == hashlib.sha256(weights["ours"].read_bytes()).hexdigest()
    assert sidecar["models"]["embedding_model"] == "dlib-resnet-128"
    people = sidecar["people"]
    assert [p["requested"]["expression"] for p in people] == ["happy", "surprised"]
    assert [p["target_expression"] for p in people] == ["happy", "surprised"]
    assert people[0]["reference"]["source"] == refs["obama"] and people[0]["reference"]["expression"] in (
        "afraid",
        "angry",
        "disgusted",
        "happy",
        "neutral",
        "sad",
        "surprised",
    )
    assert people[1]["box"] == [0.1, 0.55, 0.9, 0.95]
    assert {"load", "analysis", "denoise", "decode", "total", "write"} <= set(sidecar["timings"])
    assert not list(tmp_path.glob(".dynamicid-infer-*"))


def test_same_seed_same_pixels(tmp_path, weights, refs):
    outputs = []
    for name in ("a.png", "b.png"):
        args = ["--prompt", "a portrait", "--person", refs["obama"], "--seed", "11", "--size", "64x64"]
        result = run([*args, "--out", str(tmp_path / name)], ["--weights", str(weights["ours"])])
        assert result.exit_code == 0, result.output
        assert f"wrote {tmp_path / name}" in result.stdout
        outputs.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(*outputs)


def test_landmark_image_and_keep(tmp_path, weights, refs):
    args = ["--prompt", "p", "--person", refs["obama"], "--person", refs["biden"], "--size", "64x64"]
    args += ["--landmark-image", refs["biden"], "--landmark-image", "keep", "--expression", "keep"]
    args += ["--expression", "sad", "--out", str(tmp_path / "l.png")]
    result = run(args, ["--weights", str(weights["ours"])])
    assert result.exit_code == 0, result.output
    first, second = json.loads((tmp_path / "l.json").read_text())["people"]
    assert first["edited"] and first["landmark_image"] == refs["biden"]
    assert first["requested"] == {"expression": None, "pose": None, "landmark_image": refs["biden"], "box": None}
    assert second["edited"] and second["target_expression"] == "sad" and second["landmark_image"] is None


def test_base_model_folder(tmp_path, weights, refs):
    from diffusers import StableDiffusionPipeline

    base = load_base_model("tiny-random")
    folder = tmp_path / "sd"
    StableDiffusionPipeline(
        base.vae,
        base.text_encoder,
        base.tokenizer,
        base.unet,
        base.noise_scheduler,
        None,
        None,
        image_encoder=base.image_encoder,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    args = ["--prompt", "p", "--person", refs["obama"], "--seed", "1", "--out", str(tmp_path / "f.png")]
    result = run(args, ["--weights", str(weights["ours"])], base_model=str(folder))
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "f.json").read_text())
    hashes = sidecar["models"]["base_files_sha256"]["base_model"]
    assert {"unet/diffusion_pytorch_model.safetensors", "image_encoder/config.json", "model_index.json"} <= set(hashes)
    for name, digest in hashes.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
    assert Image.open(tmp_path / "f.png").size == (64, 64)
    assert sidecar["settings"]["scheduler"] == "DDIMScheduler"


def test_release_files(tmp_path, weights, refs):
    release = weights["release"]
    files = [
        "--saa",
        str(release["saa"]),
        "--imr",
        str(release["imr"]),
        "--keypoint-encoder",
        str(release["keypoint_encoder"]),
    ]
    result = run(two_people(refs, "--out", str(tmp_path / "r.png"), "--seed", "1"), files)
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "r.json").read_text())
    assert sidecar["models"]["weights_format"] == "release"
    assert set(sidecar["models"]["files"]) == {"saa", "imr", "keypoint_encoder"}
    assert Image.open(tmp_path / "r.png").size == (64, 64)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-face", r"no face found in reference of person 1 .*dog\.jpg"),
        ("unreadable", r"cannot load image .*text_file_named\.png"),
        ("box-outside", r"box of person 1 .* is outside \[0, 1\]"),
        ("fewer-boxes", r"1 --box for 2 --person"),
        ("other-base", r"cross_attention_dim=768, but the target has cross_attention_dim=32"),
        ("expression", r"unknown expression 'smug'; valid: afraid, angry, disgusted, happy, neutral, sad, surprised"),
        ("no-weights", r"no weights: give --weights FILE"),
        ("size", r"--size 60x64: width and height must be multiples of 8 in 8\.\.4096"),
        ("huge-size", r"--size 100000x100000: width and height must be multiples of 8 in 8\.\.4096"),
        ("id-scale-nan", r"`id_scale` must be a finite number >= 0, got nan"),
    ],
)
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, weights, refs, case, message):
    out = tmp_path / "out" / "x.png"
    out.parent.mkdir()
    weights_args = ["--weights", str(weights["ours"])]
    person = ["--prompt", "p", "--person", refs["obama"]]
    args = {
        "no-face": ["--prompt", "p", "--person", refs["dog"]],
        "unreadable": ["--prompt", "p", "--person", refs["broken"]],
        "box-outside": [*person, "--box", "0.1,0.1,1.5,0.5"],
        "fewer-boxes": [*person, "--box", "0,0,1,0.5", "--person", refs["biden"]],
        "other-base": person,
        "expression": [*person, "--expression", "smug"],
        "no-weights": person,
        "size": [*person, "--size", "60x64"],
        "huge-size": [*person, "--size", "100000x100000"],
        "id-scale-nan": [*person, "--id-scale", "nan"],
    }[case]
    if case == "other-base":
        weights_args = ["--weights", str(weights["other_base"])]
    if case == "no-weights":
        weights_args = []
    result = run([*args, "--out", str(out)], weights_args)
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert "\n" not in error_lines[0]
    assert re.search(message, error_lines[0]), error_lines[0]
    assert list(out.parent.iterdir()) == []
