"""The evaluation loop end to end: manifest -> `dynamicid-infer batch` (tiny-random FAKE base, random FAKE
weights) -> `dynamicid-eval score` -> `dynamicid-eval compare`; CLIP-T with a tiny random CLIP folder."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dynamicid.curation import build_dataset
from dynamicid.evaluate import Case, FaceScorer, measure
from dynamicid.evaluate.cli import main as eval_main
from dynamicid.evaluate.clip_t import ClipScorer
from dynamicid.faces import FaceAnalyzer
from dynamicid.infer.cli import main as infer_main
from dynamicid.infer.manifest import ManifestPerson, read_manifest
from dynamicid.models.base import load_base_model
from dynamicid.schemas import EXPRESSIONS
from dynamicid.schemas.prompts import benchmark_prompts
from dynamicid.testing import build_tiny_tokenizer, random_parts, save_random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GENERATE = ["--base-model", "tiny-random", "--face-backend", "embedded", "--steps", "2", "--size", "64x64"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    parts = random_parts(load_base_model("tiny-random"), FaceAnalyzer("embedded"))
    return save_random_weights(parts, tmp_path_factory.mktemp("w") / "dynamicid.safetensors")


@pytest.fixture(scope="module")
def refs(shared_faces):
    identities = shared_faces / "identities"
    return {
        "obama": [str(identities / "obama" / n) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")],
        "biden": [str(identities / "biden" / n) for n in ("biden.jpg", "biden2.jpg")],
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory, refs):
    folder = tmp_path_factory.mktemp("bench")
    rows = [
        {"id": "solo", "prompt": "a portrait", "seed": 3, "people": [{"references": refs["obama"][:2]}]},
        {
            "id": "duo",
            "prompt": "two friends",
            "seed": 4,
            "steps": 3,
            "people": [
                {
                    "references": refs["obama"][:1],
                    "held_out": refs["obama"][2:],
                    "expression": "happy",
                    "box": [0.1, 0.05, 0.9, 0.45],
                },
                {"references": refs["biden"][:1], "expression": "surprised", "box": [0.1, 0.55, 0.9, 0.95]},
            ],
        },
    ]
    path = folder / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory, bench, weights):
    out = tmp_path_factory.mktemp("gen")
    result = CliRunner().invoke(
        infer_main, ["batch", "--manifest", str(bench), "--out-dir", str(out), "--weights", str(weights), *GENERATE]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("wrote ") == 2
    return out


def test_batch_writes_what_generate_writes_for_each_row(generated, weights, refs, tmp_path):
    assert sorted(p.name for p in generated.iterdir()) == ["duo.json", "duo.png", "solo.json", "solo.png"]
    sidecar = json.loads((generated / "duo.json").read_text())
    assert sidecar["tool"] == "dynamicid-infer batch" and len(sidecar["settings_hash"]) == 64
    assert sidecar["settings"]["steps"] == 3 and sidecar["settings"]["seed"] == 4  # the row's own settings
    assert [p["requested"]["expression"] for p in sidecar["people"]] == ["happy", "surprised"]
    assert sidecar["row"]["people"][0]["held_out"] == refs["obama"][2:]
    # `generate` with the same settings gives the same pixels and the same sidecar sections
    out = tmp_path / "duo.png"
    args = ["generate", *GENERATE, "--weights", str(weights), "--prompt", "two friends", "--seed", "4", "--steps", "3"]
    args += ["--person", refs["obama"][0], "--expression", "happy", "--box", "0.1,0.05,0.9,0.45"]
    args += ["--person", refs["biden"][0], "--expression", "surprised", "--box", "0.1,0.55,0.9,0.95", "--out", str(out)]
    result = CliRunner().invoke(infer_main, args)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(generated / "duo.png")))
    single = json.loads(out.with_suffix(".json").read_text())
    assert set(sidecar) - set(single) == {"row", "settings_hash"}
    assert sidecar["settings"] == single["settings"]
    # `score` reads generate's sidecars too: one reference per person, the boxes the pipeline used
    result = CliRunner().invoke(
        eval_main, ["score", str(tmp_path), "--out", str(tmp_path / "s"), "--face-backend", "embedded"]
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "s" / "per_person.parquet").to_pylist()
    assert [(r["id"], r["person"], r["expression_requested"]) for r in rows] == [
        ("duo", 0, "happy"),
        ("duo", 1, "surprised"),
    ]


def test_batch_skips_rows_done_and_redoes_changed_ones(generated, bench, weights):
    before = (generated / "solo.png").stat().st_mtime_ns
    args = ["batch", "--manifest", str(bench), "--out-dir", str(generated), "--weights", str(weights), *GENERATE]
    result = CliRunner().invoke(infer_main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("skipped") == 2 and "wrote" not in result.output
    # another run-wide setting: a new hash, every row is generated again
    result = CliRunner().invoke(infer_main, [*args, "--guidance-scale", "3"])
    assert result.exit_code == 0 and result.output.count("wrote") == 2
    assert (generated / "solo.png").stat().st_mtime_ns != before
    assert json.loads((generated / "solo.json").read_text())["settings"]["guidance_scale"] == 3.0
    result = CliRunner().invoke(infer_main, [*args, "--guidance-scale", "3"])
    assert result.output.count("skipped") == 2


def test_batch_bad_manifest_stops_before_writing(tmp_path, weights, refs):
    manifest = tmp_path / "bad.jsonl"
    good = {"id": "a", "prompt": "p", "people": [{"references": refs["obama"][:1]}]}
    bad = {"id": "b", "prompt": "p", "people": [{"references": refs["obama"][:1], "box": [0, 0, 2, 1]}]}
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    out = tmp_path / "gen"
    result = CliRunner().invoke(
        infer_main, ["batch", "--manifest", str(manifest), "--out-dir", str(out), "--weights", str(weights), *GENERATE]
    )
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "line 2 (id 'b')" in result.output and "[0, 1]" in result.output
    assert not out.exists()


def test_batch_reference_without_a_face_stops_naming_the_row(tmp_path, weights, refs, shared_faces):
    manifest = tmp_path / "m.jsonl"
    good = {"id": "a", "prompt": "p", "seed": 1, "people": [{"references": refs["obama"][:1]}]}
    dog = {"id": "b", "prompt": "p", "people": [{"references": [str(shared_faces / "no_face" / "dog.jpg")]}]}
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(dog) + "\n")
    out = tmp_path / "gen"
    args = ["batch", "--manifest", str(manifest), "--out-dir", str(out), "--weights", str(weights), *GENERATE]
    result = CliRunner().invoke(infer_main, args)
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "(id 'b')" in result.stderr and "no face found" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png"]  # the rows before it are kept


def test_score_reads_batch_sidecars_and_compare_prints_deltas(generated, bench, tmp_path, shared_faces, refs):
    scores_gen = tmp_path / "scores_gen"
    result = CliRunner().invoke(
        eval_main, ["score", str(generated), "--out", str(scores_gen), "--face-backend", "embedded"]
    )
    assert result.exit_code == 0, result.output
    per_person = pq.read_table(scores_gen / "per_person.parquet").to_pylist()
    assert sorted((r["id"], r["person"]) for r in per_person) == [("duo", 0), ("duo", 1), ("solo", 0)]
    assert {r["id"]: r["reference_faces"] for r in per_person if r["person"] == 0} == {"duo": 1, "solo": 2}
    per_image = {r["id"]: r for r in pq.read_table(scores_gen / "per_image.parquet").to_pylist()}
    for row in per_image.values():  # the FAKE model draws noise: whatever it shows is counted consistently
        assert row["missing"] == max(row["people"] - row["faces_found"], 0)
    summary = json.loads((scores_gen / "summary.json").read_text())
    assert summary["single_id"]["images"] == 1 and summary["multi_id"]["images"] == 1

    # The same manifest answered with real photos ("another method"): obama.jpg for both rows
    photos = tmp_path / "photos"
    photos.mkdir()
    for row_id in ("solo", "duo"):
        shutil.copy(refs["obama"][1], photos / f"{row_id}.jpg")
    scores_real = tmp_path / "scores_real"
    result = CliRunner().invoke(
        eval_main,
        ["score", str(photos), "--manifest", str(bench), "--out", str(scores_real), "--face-backend", "embedded"],
    )
    assert result.exit_code == 0, result.output

    result = CliRunner().invoke(eval_main, ["compare", str(scores_gen), str(scores_real)])
    assert result.exit_code == 0, result.output
    assert "face_sim" in result.output and "95% interval" in result.output and "B - A" in result.output
    result = CliRunner().invoke(eval_main, ["compare", str(scores_gen), str(scores_real), "--json"])
    comparison = json.loads(result.output)
    real = json.loads((scores_real / "summary.json").read_text())
    face_sim = comparison["figures"]["all"]["face_sim"]
    assert face_sim["b"] == pytest.approx(real["all"]["face_sim"]["mean"])
    assert face_sim["delta"] == pytest.approx(face_sim["b"] - face_sim["a"])
    assert face_sim["low"] <= face_sim["delta"] <= face_sim["high"] and face_sim["paired_images"] == 2
    result = CliRunner().invoke(eval_main, ["compare", str(scores_gen), str(tmp_path)])
    assert result.exit_code == 2 and "not a dynamicid-eval score folder" in result.output


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP (FAKE) saved in transformers layout: model, tokenizer and image processor files."""
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_tiny_tokenizer()
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    text |= {"num_hidden_layers": 2, "max_position_embeddings": 77, "eos_token_id": tokenizer.eos_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_t_with_a_local_tiny_clip_is_reproducible(tiny_clip, shared_faces):
    from transformers import CLIPModel

    image = Image.open(shared_faces / "group_photos" / "two_people.jpg")
    scorer = ClipScorer(tiny_clip)
    first = [scorer.score(image, p) for p in ("two men in suits", "a dog")]
    again = ClipScorer(tiny_clip)
    assert [again.score(image, p) for p in ("two men in suits", "a dog")] == first
    assert first[0] != first[1] and all(-1.0 <= v <= 1.0 for v in first)
    # the cosine of the model's own projected embeddings
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    ids = scorer.tokenizer(["two men in suits"], padding="max_length", max_length=77, return_tensors="pt")
    pixels = scorer.processor(images=[image.convert("RGB")], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
    expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert first[0] == pytest.approx(expected, abs=1e-6)


def test_score_with_clip_model_fills_clip_t_and_records_the_model(tiny_clip, shared_faces, tmp_path):
    photo = shared_faces / "identities" / "obama" / "obama2.jpg"
    case = Case("o", photo, "a man at a podium", (ManifestPerson((photo,)),))
    scores = [measure([case], FaceScorer(FaceAnalyzer("embedded")), ClipScorer(tiny_clip)) for _ in range(2)]
    assert scores[0].per_image[0]["clip_t"] == scores[1].per_image[0]["clip_t"] is not None
    assert scores[0].summary["all"]["clip_t"]["mean"] == scores[0].per_image[0]["clip_t"]
    assert tiny_clip.name in scores[0].summary["models"]["clip_t"]
    assert not any("CLIP-T left out" in n for n in scores[0].summary["notes"])
    result = CliRunner().invoke(
        eval_main, ["score", str(tmp_path), "--out", str(tmp_path / "s"), "--clip-model", str(tmp_path)]
    )
    assert result.exit_code == 2 and result.output.startswith("error: ")


def test_manifest_from_a_curated_dataset(tmp_path, shared_faces):
    photos = tmp_path / "photos"
    for identity in ("obama", "biden", "kit_harington"):
        shutil.copytree(shared_faces / "identities" / identity, photos / identity)
    dataset = tmp_path / "curated"
    build_dataset(photos, dataset, per_identity=3, progress=False)
    out = tmp_path / "bench" / "multi.jsonl"
    out.parent.mkdir()
    args = [
        "manifest",
        "--dataset",
        str(dataset),
        "--prompts",
        "multi",
        "--people",
        "2",
        "--rows",
        "4",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(eval_main, args)
    assert result.exit_code == 0, result.output
    rows = read_manifest(out)  # every path exists, labels and boxes are valid
    assert [r.id for r in rows] == ["r00000", "r00001", "r00002", "r00003"]
    templates = {t.replace("{subject}", "two people") for t in benchmark_prompts("multi")}
    for row in rows:
        assert row.prompt in templates and row.seed is not None
        identities = [p.identity for p in row.people]
        assert len(set(identities)) == 2 and all(p.expression in EXPRESSIONS for p in row.people)
        for person in row.people:
            assert person.box is not None and not set(person.references) & set(person.held_out)
            assert all(p.parent.name == person.identity for p in (*person.references, *person.held_out))
    first = out.read_text()
    result = CliRunner().invoke(eval_main, args)
    assert out.read_text() == first  # same seed, same benchmark
    result = CliRunner().invoke(eval_main, [*args[:-2], "--people", "5", "--out", str(out)])
    assert result.exit_code == 2 and "fewer than --people 5" in result.output


@pytest.mark.parametrize("command", [[], ["score"], ["compare"], ["manifest"]])
def test_eval_help(command):
    result = CliRunner().invoke(eval_main, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_batch_help():
    result = CliRunner().invoke(infer_main, ["batch", "--help"])
    assert result.exit_code == 0 and "--manifest" in result.output and "--guidance-scale" in result.output


def test_shipped_prompt_lists():
    from dynamicid.schemas.prompts import benchmark_prompt

    for kind in ("single", "multi"):
        templates = benchmark_prompts(kind)
        assert len(templates) >= 20 and len(set(templates)) == len(templates)
        assert all("{subject}" in t and not t.startswith("#") for t in templates)
    assert benchmark_prompt("{subject} in a cafe", 3) == "three people in a cafe"
    with pytest.raises(ValueError, match="valid: single, multi"):
        benchmark_prompts("sports")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: text[: len(text) // 2], "not readable JSON"),
        (
            lambda text: json.dumps({**json.loads(text), "outputs": {"images": 5}}),
            "not a valid dynamicid-infer sidecar",
        ),
        (lambda text: json.dumps({**json.loads(text), "people": "everyone"}), "not a valid dynamicid-infer sidecar"),
    ],
)
def test_score_refuses_a_damaged_sidecar_naming_it(generated, tmp_path, damage, message):
    folder = tmp_path / "generated"
    shutil.copytree(generated, folder)
    sidecar = folder / "solo.json"
    sidecar.write_text(damage(sidecar.read_text()))
    result = CliRunner().invoke(eval_main, ["score", str(folder), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {sidecar}: {message}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()
