"""README "The whole path in one sitting" on tiny-random-flux, through the four CLIs as a user types it: curate real
photos -> cache-prompts -> anchor -> cache-tokens -> reconfigure (both stages from the prompt cache, without the T5) -> generate two people in boxes with two expressions -> batch ->
score. Tiny sizes and 2 steps per stage: it checks that the stages fit together on the Flux family, not quality."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from dynamicid.curation.cli import main as curate
from dynamicid.evaluate.cli import main as evaluate
from dynamicid.infer.cli import main as infer
from dynamicid.models import load_dynamicid
from dynamicid.train.cli import main as train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLUX = ["--base-model", "tiny-random-flux"]
QUICK = ["--max-steps", "2", "--eval-samples", "2", "--report-to", "none"]


def _run(cli, arguments: list[str]) -> str:
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_whole_path_runs_on_tiny_random_flux(identity_photos, tmp_path):
    photos = identity_photos("obama", "kit_harington")
    ds, run1, run2, tokens, prompts = (str(tmp_path / n) for n in ("ds", "run1", "run2", "tokens", "prompts"))
    _run(curate, ["build", str(photos), ds, "--crop-size", "256"])

    _run(train, ["cache-prompts", *FLUX, "--dataset", ds, "--output", prompts])
    cached = ["--prompt-cache", prompts]
    _run(train, ["anchor", *FLUX, "--dataset", ds, "--output-dir", run1, "--train-batch-size", "2", *cached, *QUICK])
    anchor = f"{run1}/weights.safetensors"
    _run(train, ["cache-tokens", *FLUX, "--anchor", anchor, "--dataset", ds, "--output", tokens])
    arguments = ["reconfigure", *FLUX, "--anchor", anchor, "--tokens", tokens, "--dataset", ds, "--output-dir", run2]
    _run(train, [*arguments, "--targets-per-identity", "2", *cached, *QUICK])
    weights = ["--weights", anchor, "--weights", f"{run2}/weights.safetensors"]
    for file, parts in (
        (anchor, {"saa", "face_encoder"}),
        (f"{run2}/weights.safetensors", {"imr", "keypoint_encoder"}),
    ):
        metadata = load_dynamicid(file).metadata
        assert metadata.base_family == "flux" and parts <= set(metadata.parts), (file, metadata)

    out = tmp_path / "out.png"
    people = []
    for photo, expression, box in (
        (photos / "obama", "happy", "0,0,1,0.5"),
        (photos / "kit_harington", "surprised", "0,0.5,1,1"),
    ):
        people += ["--person", str(sorted(photo.iterdir())[0]), "--expression", expression, "--box", box]
    arguments = ["generate", *FLUX, *weights, "--prompt", "two friends in a cafe", *people]
    sidecar = json.loads(_run(infer, [*arguments, "--size", "96x64", "--steps", "2", "--out", str(out), "--json"]))
    assert Image.open(out).size == (96, 64)
    assert [(p["target_expression"], p["box"]) for p in sidecar["people"]] == [
        ("happy", [0.0, 0.0, 1.0, 0.5]),
        ("surprised", [0.0, 0.5, 1.0, 1.0]),
    ]

    manifest = str(tmp_path / "bench.jsonl")
    _run(
        evaluate, ["manifest", "--dataset", ds, "--prompts", "multi", "--people", "2", "--rows", "2", "--out", manifest]
    )
    gen = tmp_path / "gen"
    _run(
        infer,
        ["batch", "--manifest", manifest, "--out-dir", str(gen), *FLUX, *weights, "--size", "64x64", "--steps", "2"],
    )
    images = sorted(gen.glob("*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (64, 64) for p in images)
    assert all(len(json.loads(p.with_suffix(".json").read_text())["people"]) == 2 for p in images)

    _run(evaluate, ["score", str(gen), "--out", str(tmp_path / "scores")])
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    # every generated person scored; the tiny model's noise shows no face, so none is found
    assert (summary["images"], summary["people"]) == (2, 4) and summary["all"]["face_found"]["mean"] == 0.0
