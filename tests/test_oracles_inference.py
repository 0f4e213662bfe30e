"""Inference defaults and the identity / edit paths, observed in what the models receive (hooks, the SAA
processors' recorded gate maps and ID attention) and checked against METHOD.md's reference settings.

Tiny-random FAKE base, random FAKE DynamicID weights (`dynamicid.testing`), the real embedded face layer on the
real photos of ../shared/data/faces. The images are noise; the layout, schedule and token plumbing are not.
"""

import re

import numpy as np
import oracles
import pytest
import torch
from diffusers import DDIMScheduler

from dynamicid.faces import FaceAnalyzer, ffhq_align, load_image, transform_points
from dynamicid.infer import DynamicIDPipeline, Person
from dynamicid.infer.people import DynamicIDWarning
from dynamicid.infer.references import ReferenceAnalyzer
from dynamicid.models import saa_activation_maps, saa_id_attention_probs
from dynamicid.models.base import load_base_model
from dynamicid.testing import random_parts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RELEASE_BOXES = [(0.1, 0.1, 0.5, 0.4), (0.1, 0.6, 0.5, 0.9)]  # METHOD.md "Reference settings of the release"
BOOST, BOOST_STEPS = 2.0, 12  # infer_scale, infer_end of the release with two persons


@pytest.fixture(scope="module")
def analyzer():
    return ReferenceAnalyzer(FaceAnalyzer("embedded"))


PHOTOS = {
    "obama": "identities/obama/obama.jpg",
    "biden": "identities/biden/biden.jpg",
    "salley": "identities/John_Salley/000179_02159509.jpg",
    "two_people": "group_photos/two_people.jpg",
}


@pytest.fixture(scope="module")
def photos(shared_faces):
    return {name: shared_faces / path for name, path in PHOTOS.items()}


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny-random")


@pytest.fixture(scope="module")
def parts(base, analyzer):
    return random_parts(base, analyzer, seed=1)  # installs SAA on base.unet


@pytest.fixture(scope="module")
def pipe(base, parts, analyzer):
    pipe = DynamicIDPipeline.from_base(base)
    pipe.set_dynamicid(parts.face_encoder, parts.imr, parts.keypoint_encoder, face_analyzer=analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, people, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return pipe("two friends in a cafe", people, generator=torch.Generator().manual_seed(seed), **kwargs)


def gates_per_step(pipe, people, steps, **kwargs):
    """The recorded SAA gate maps (B, h, w) of every cross-attention layer, after each denoising step."""
    recorded = []

    def keep(pipeline, step, timestep, tensors):
        recorded.append({name: gate.clone() for name, gate in saa_activation_maps(pipeline.unet).items()})
        return {}

    generate(pipe, people, num_inference_steps=steps, return_activation_maps=True, callback_on_step_end=keep, **kwargs)
    assert len(recorded) == steps and all(recorded)
    return recorded


def box_mask(box, grid):
    """METHOD.md: rows int(y0*H) .. int(y1*H), columns int(x0*W) .. int(x1*W), end-exclusive."""
    (y0, x0, y1, x1), (h, w) = box, grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = True
    return mask


def test_boost_lasts_exactly_the_first_12_of_20_steps_with_two_people(pipe, photos):
    """Inside the boxes the gate is a + 2 (a in [0, 1]) while boosted, then a; outside it is a / 3, then a."""
    people = [Person(photos["obama"], box=RELEASE_BOXES[0]), Person(photos["biden"], box=RELEASE_BOXES[1])]
    boosted = []
    for gates in gates_per_step(pipe, people, 20, height=64, width=64):
        inside_min, inside_max, outside_max = [], [], []
        for gate in gates.values():
            inside = box_mask(RELEASE_BOXES[0], gate.shape[1:]) | box_mask(RELEASE_BOXES[1], gate.shape[1:])
            inside_min.append(float(gate[:, inside].min()))
            inside_max.append(float(gate[:, inside].max()))
            outside_max.append(float(gate[:, ~inside].max()))
        if min(inside_min) >= BOOST:
            assert max(inside_max) <= BOOST + 1 + 1e-5 and max(outside_max) <= 1 / (BOOST + 1) + 1e-5
            boosted.append(True)
        else:
            assert max(inside_max) <= 1 + 1e-5 and max(outside_max) <= 1 + 1e-5
            boosted.append(False)
    assert boosted == [True] * BOOST_STEPS + [False] * (20 - BOOST_STEPS)


def test_one_person_is_never_boosted(pipe, photos):
    for gates in gates_per_step(pipe, [Person(photos["obama"])], 14, height=64, width=64):
        assert max(float(gate.max()) for gate in gates.values()) <= 1 + 1e-5


def test_without_boxes_people_get_equal_vertical_strips(pipe, photos):
    """Three people, no boxes, a 96x64 image: in person i's strip x in [i/3, (i+1)/3) only i's tokens are attended."""
    people = [Person(photos[name]) for name in ("obama", "biden", "salley")]
    probs = {}

    def keep(pipeline, step, timestep, tensors):
        probs.update(saa_id_attention_probs(pipeline.unet)) if step == 0 else None
        return {}

    generate(pipe, people, height=64, width=96, return_activation_maps=True, callback_on_step_end=keep)
    assert probs
    grids = set()
    for layer in probs.values():  # (B, heads, Q, 3 people x 4 tokens)
        q = layer.shape[2]
        grid = (8, 12) if q == 96 else (4, 6)
        assert grid[0] * grid[1] == q
        grids.add(grid)
        per_person = layer.float().unflatten(-1, (3, 4)).sum(-1)  # (B, heads, Q, 3)
        for person in range(3):
            strip = box_mask((0.0, person / 3, 1.0, (person + 1) / 3), grid).flatten()
            torch.testing.assert_close(
                per_person[:, :, strip, person], torch.ones_like(per_person[:, :, strip, person]), rtol=0, atol=1e-5
            )
    assert grids == {(8, 12), (4, 6)}


def test_the_largest_face_of_a_reference_is_used(pipe, analyzer, photos):
    seen = []
    handle = pipe.dynamicid.face_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with pytest.warns(DynamicIDWarning, match="2 faces"):
            generate(pipe, [Person(photos["two_people"])])
    finally:
        handle.remove()
    faces = analyzer.analyzer.analyze(load_image(photos["two_people"]))
    areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
    largest, other = faces[int(np.argmax(areas))], faces[int(np.argmin(areas))]
    assert not np.allclose(largest.embedding, other.embedding)
    torch.testing.assert_close(seen[0][0], torch.from_numpy(np.asarray(largest.embedding, np.float32)))


def test_defaults_are_50_ddim_steps_and_guidance_5(pipe, photos):
    assert isinstance(pipe.scheduler, DDIMScheduler)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append((int(args[1]), args[0].shape[0])))
    try:
        pipe("a person", [Person(photos["obama"])], height=64, width=64, output_type="latent")
    finally:
        handle.remove()
    # DDIM over 1000 training steps, 50 steps, steps_offset 1 ("leading" spacing): 981, 961, ..., 1.
    assert [t for t, _ in calls] == list(range(981, 0, -20))
    assert {batch for _, batch in calls} == {2}, "classifier-free guidance: one batched call per step"

    people = [Person(photos["obama"])]
    default = generate(pipe, people, seed=4).images
    np.testing.assert_array_equal(default, generate(pipe, people, seed=4, guidance_scale=5.0).images)
    assert not np.array_equal(default, generate(pipe, people, seed=4, guidance_scale=4.0).images)


def test_the_python_apis_id_scale_defaults_to_the_release_setting(pipe, photos):
    """METHOD.md "Reference settings of the release": id_scale 1. Called without it, the pipeline gives the images
    of that value (the CLI's default is pinned in tests/test_infer_cli.py)."""
    match = re.search(r"Reference settings of the release:.*?id_scale (\d+(?:\.\d+)?)", oracles.method_md(), re.S)
    assert match, "METHOD.md names the release's id_scale"
    release = float(match.group(1))
    people = [Person(photos["obama"]), Person(photos["salley"])]
    default = generate(pipe, people, seed=5)
    assert default.saa["id_scale"] == release
    np.testing.assert_array_equal(default.images, generate(pipe, people, seed=5, id_scale=release).images)
    assert not np.array_equal(default.images, generate(pipe, people, seed=5, id_scale=0.8 * release).images)


def test_id_scale_zero_ignores_the_reference_and_id_scale_one_does_not(pipe, photos):
    for people in ([Person(photos["obama"])], [Person(photos["obama"]), Person(photos["salley"])]):
        others = [Person(photos["biden"]), *people[1:]]
        np.testing.assert_array_equal(
            generate(pipe, people, id_scale=0.0).images, generate(pipe, others, id_scale=0.0).images
        )
        assert np.abs(generate(pipe, people).images - generate(pipe, others).images).max() > 1e-3


def test_an_edited_expression_reaches_the_unet_through_the_imr(pipe, parts, base, analyzer, photos):
    """Same seed, same reference: an expression edit changes the image, the UNet's ID tokens are the IMR's output,
    and the IMR gets the pooled face prompts and the reference's landmark map (METHOD.md "IMR")."""
    person = Person(photos["obama"])
    reference = pipe.reference_analyzer.analyze(photos["obama"])
    target = "surprised" if reference.expression != "surprised" else "sad"
    edited = Person(photos["obama"], expression=target)

    seen: dict[str, list] = {"imr": [], "kpe": [], "unet": []}
    handles = [
        parts.imr.register_forward_hook(
            lambda m, args, out: seen["imr"].append(([a.clone() for a in args], out.clone()))
        ),
        parts.keypoint_encoder.register_forward_pre_hook(lambda m, args: seen["kpe"].append(args[0].clone())),
        pipe.unet.register_forward_pre_hook(
            lambda m, args, kwargs: seen["unet"].append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
        ),
    ]
    try:
        plain = generate(pipe, [person], seed=9).images
        seen["unet"].clear()
        out = generate(pipe, [edited], seed=9)
    finally:
        for handle in handles:
            handle.remove()
    assert not np.array_equal(plain, out.images)
    (args, tokens) = seen["imr"][0]
    assert tokens.shape == (1, 4, 32)
    torch.testing.assert_close(seen["unet"][0][1, -4:], tokens[0], rtol=0, atol=0)  # conditional half
    assert not torch.allclose(tokens, args[0]), "the IMR rewrote the tokens"

    prompts = [
        oracles.face_prompt(reference.expression, reference.pose),
        oracles.face_prompt(target, reference.pose),
    ]
    text = oracles.pooled_text(base.text_encoder, base.tokenizer, prompts)
    torch.testing.assert_close(args[3], text[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[4], text[1:], rtol=1e-5, atol=1e-5)
    photo = np.asarray(load_image(photos["obama"]))
    face = analyzer.analyzer.analyze(photo)[0]
    _, matrix = ffhq_align(photo, face, size=512)
    landmark_map = oracles.landmark_map(transform_points(face.landmarks, matrix), 512)
    maps = seen["kpe"][0]
    assert maps.shape == (2, 1, 96, 96)
    torch.testing.assert_close(maps[:, 0], torch.stack([landmark_map, landmark_map]), rtol=0, atol=0)

    # The tokens the IMR returns are what drives the image: other tokens, other pixels.
    handle = parts.imr.register_forward_hook(lambda m, args, out: out + 1.0)
    try:
        shifted = generate(pipe, [edited], seed=9).images
    finally:
        handle.remove()
    assert np.abs(shifted - out.images).max() > 1e-3


def test_two_target_prompts_give_each_person_their_own_tokens(pipe, parts, base, photos):
    """The same reference twice, edited to two expressions in one call: each person's IMR call gets its own target
    face prompt (METHOD.md's template, pooled CLIP text recomputed here), and the UNet receives two different token
    sets, each the output of that person's edit."""
    reference = pipe.reference_analyzer.analyze(photos["obama"])
    targets = [e for e in ("happy", "sad", "angry") if e != reference.expression][:2]
    people = [Person(photos["obama"], expression=e, box=box) for e, box in zip(targets, RELEASE_BOXES, strict=True)]
    edits, states = [], []
    handles = [
        parts.imr.register_forward_hook(lambda m, args, out: edits.append((args[4].clone(), out.clone()))),
        pipe.unet.register_forward_pre_hook(
            lambda m, args, kwargs: states.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
        ),
    ]
    try:
        generate(pipe, people, num_inference_steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert len(edits) == 2
    expected = oracles.pooled_text(
        base.text_encoder, base.tokenizer, [oracles.face_prompt(e, reference.pose) for e in targets]
    )
    ids = states[0][1, -8:].unflatten(0, (2, 4))  # conditional half: [text ; person 1 ; person 2]
    for person, (text, tokens) in enumerate(edits):
        torch.testing.assert_close(text[0], expected[person], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ids[person], tokens[0], rtol=0, atol=0)
    assert (ids[0] - ids[1]).abs().max() > 1e-3
