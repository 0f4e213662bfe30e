"""`ModelOptions.offload` and `ModelOptions.weights_dtype` (`--offload`, `--weights-dtype`): the images stay
those of the plain run, on the three families' tiny FAKE bases (tiny-random, tiny-random-sdxl, tiny-random-flux)
with random FAKE weights and real reference photos, through the public API and once through the CLI.

Tolerances (uint8 pixels against the plain run): model offload moves the same weights, so the pixels are equal;
float8 storage rounds every denoiser weight to 3 mantissa bits, so the images may differ a little (mean
absolute difference <= FLOAT8_MEAN_TOLERANCE).
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dynamicid.faces import FaceAnalyzer
from dynamicid.infer import GenerateRequest, ModelOptions, Person, load_pipeline
from dynamicid.infer.cli import main as infer
from dynamicid.infer.generate import generate
from dynamicid.models.base import load_base_model
from dynamicid.testing import random_parts, save_random_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASES = ("tiny-random", "tiny-random-sdxl", "tiny-random-flux")
FLOAT8_MEAN_TOLERANCE = 4.0  # measured 2.06 (tiny-random), 2.04 (tiny-random-sdxl), 0.52 (tiny-random-flux), 2 steps


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    analyzer, folder = FaceAnalyzer("embedded"), tmp_path_factory.mktemp("memory-weights")
    return {
        base: save_random_weights(random_parts(load_base_model(base), analyzer), folder / f"{base}.safetensors")
        for base in BASES
    }


@pytest.fixture(scope="module")
def request_(shared_faces):
    faces = shared_faces / "identities"
    people = [Person(faces / "obama" / "obama.jpg", expression="happy"), Person(faces / "biden" / "biden.jpg")]
    return GenerateRequest("two friends in a cafe", people, size=(64, 48), steps=2, seed=3)  # Flux: 16 | sides


def run(base, weights, request, **memory):
    options = ModelOptions(base, [weights[base]], face_backend="embedded", device="cpu", **memory)
    pipe = load_pipeline(options)
    pipe.set_progress_bar_config(disable=True)
    generated = generate(pipe, request)
    return pipe, generated, np.asarray(generated.images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def plain(weights, request_):
    return {base: run(base, weights, request_)[2] for base in BASES}


@pytest.mark.parametrize("base", BASES)
def test_model_offload_gives_the_plain_images(base, weights, request_, plain):
    pipe, generated, image = run(base, weights, request_, offload="model")
    assert generated.sidecar["settings"]["offload"] == "model"
    assert {type(hook).__name__ for hook in pipe._all_hooks} == {"UserCpuOffloadHook"}  # offloaded
    assert np.array_equal(image, plain[base])


@pytest.mark.parametrize("base", BASES)
def test_float8_weights_stay_within_tolerance_of_the_plain_images(base, weights, request_, plain):
    pipe, generated, image = run(base, weights, request_, weights_dtype="float8")
    stored = {p.dtype for name, p in pipe.denoiser.named_parameters() if name.endswith("to_q.weight")}
    assert stored == {torch.float8_e4m3fn}  # the weights really are held in float8
    assert generated.sidecar["settings"]["weights_dtype"] == "float8"
    assert generated.sidecar["settings"]["dtype"] == "float32"  # and computed in the compute dtype
    difference = np.abs(image - plain[base])
    assert difference.mean() <= FLOAT8_MEAN_TOLERANCE, difference.mean()
    assert not np.array_equal(image, plain[base])  # the rounding is real


def test_the_cli_offloads_the_flux_base_to_the_plain_images(weights, request_, plain, tmp_path):
    out, (obama, biden) = tmp_path / "offloaded.png", (p.image for p in request_.people)
    people = ["--person", str(obama), "--expression", "happy", "--person", str(biden), "--expression", "keep"]
    arguments = ["generate", "--base-model", "tiny-random-flux", "--weights", str(weights["tiny-random-flux"])]
    arguments += ["--face-backend", "embedded", "--device", "cpu", "--offload", "model", *people]
    arguments += ["--prompt", request_.prompt, "--size", "64x48", "--steps", "2", "--seed", "3", "--out", str(out)]
    result = CliRunner().invoke(infer, arguments)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out), dtype=np.int16), plain["tiny-random-flux"])


@pytest.mark.parametrize("base", BASES)
def test_sequential_offload_on_the_cpu_is_refused_in_one_line(base, weights):
    # Sequential offload is checked on a GPU only: accelerate cannot run it with a CPU execution device.
    with pytest.raises(ValueError, match=r"^ModelOptions.offload 'sequential' needs an accelerator[^\n]*$"):
        load_pipeline(ModelOptions(base, [weights[base]], device="cpu", offload="sequential"))


def test_the_cli_refuses_sequential_offload_on_the_cpu_in_one_line(weights, request_, tmp_path):
    arguments = ["generate", "--base-model", "tiny-random-flux", "--weights", str(weights["tiny-random-flux"])]
    arguments += ["--device", "cpu", "--offload", "sequential", "--person", str(request_.people[0].image)]
    arguments += ["--prompt", "a cafe"]
    result = CliRunner().invoke(infer, [*arguments, "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "needs an accelerator" in result.output, result.output


def test_bad_memory_options_are_refused_naming_the_argument(weights):
    with pytest.raises(ValueError, match=r"ModelOptions.offload 'disk': valid: none, model, sequential"):
        load_pipeline(ModelOptions("tiny-random", [weights["tiny-random"]], offload="disk"))
    with pytest.raises(ValueError, match=r"ModelOptions.weights_dtype 'int4': valid: None, float8"):
        load_pipeline(ModelOptions("tiny-random", [weights["tiny-random"]], weights_dtype="int4"))
