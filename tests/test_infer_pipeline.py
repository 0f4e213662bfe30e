"""DynamicIDPipeline on the tiny-random FAKE base with random FAKE DynamicID weights and real reference photos.

The weights are random (`dynamicid.testing`), so the images are noise: these tests check sizes,
determinism, the layout and token plumbing, the release-format path, and that bad input is refused before
any denoising. The face analysis is the real embedded backend on the real photos in ../shared/data/faces.
"""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from dynamicid.faces import ImageLoadError
from dynamicid.infer import DynamicIDPipeline, Person, ReleaseFiles
from dynamicid.infer.people import DynamicIDWarning
from dynamicid.infer.references import NoFaceError
from dynamicid.models import saa_processors
from dynamicid.models.base import load_base_model
from dynamicid.testing import plain_images, random_parts, save_random_weights, save_release_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2


@pytest.fixture(scope="module")
def photos(shared_faces):
    identities = shared_faces / "identities"
    return {
        "obama": identities / "obama" / "obama.jpg",
        "biden": identities / "biden" / "biden.jpg",
        "two_people": shared_faces / "group_photos" / "two_people.jpg",
        "dog": shared_faces / "no_face" / "dog.jpg",
        "zero_bytes": shared_faces / "broken" / "zero_bytes.jpg",
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory, reference_analyzer):
    """Random weights for the tiny-random base, in our format and in the release's .bin layout."""
    base = load_base_model("tiny-random")
    parts = random_parts(base, reference_analyzer)
    folder = tmp_path_factory.mktemp("weights")
    ours = save_random_weights(parts, folder / "dynamicid.safetensors")
    release = save_release_layout(parts, folder / "release")
    return {"ours": ours, "release": ReleaseFiles(**release)}


def make_pipeline(weights, reference_analyzer) -> DynamicIDPipeline:
    pipe = DynamicIDPipeline.from_base(load_base_model("tiny-random"))
    pipe.load_dynamicid(weights, face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(weights, reference_analyzer):
    return make_pipeline(weights["ours"], reference_analyzer)


def generate(pipe, people, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe("two friends in a cafe", people, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize(
    ("size", "people_spec"),
    [
        ((64, 64), [("obama", None)]),
        ((96, 64), [("obama", "surprised")]),
        ((64, 64), [("obama", None), ("biden", None)]),
        ((96, 64), [("obama", "happy"), ("biden", "sad")]),
    ],
    ids=["one-square", "one-wide-edit", "two-square", "two-wide-edits"],
)
def test_images_have_the_requested_size(pipe, photos, size, people_spec):
    width, height = size
    people = [Person(photos[name], expression=expression) for name, expression in people_spec]
    out = generate(pipe, people, width=width, height=height)
    assert [image.size for image in out.images] == [(width, height)]
    assert len(out.people) == len(people)
    for person, report in zip(people, out.people, strict=True):
        assert report["edited"] == (person.expression is not None)
        assert report["reference"]["expression"] is not None
        if person.expression is not None:
            assert report["target_expression"] == person.expression
            assert (
                report["target_face_prompt"]
                == f"the expression is {person.expression}, the face is {report['target_pose']}"
            )
            assert report["source_face_prompt"].startswith(f"the expression is {report['reference']['expression']}")


def test_same_seed_same_pixels_and_other_seed_other_pixels(pipe, photos):
    people = [Person(photos["obama"], expression="happy"), Person(photos["biden"])]
    first = generate(pipe, people, seed=7, output_type="np", height=64, width=96).images
    again = generate(pipe, people, seed=7, output_type="np", height=64, width=96).images
    other = generate(pipe, people, seed=8, output_type="np", height=64, width=96).images
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_identity_tokens_and_edits_change_the_image(pipe, photos):
    obama = generate(pipe, [Person(photos["obama"])], output_type="np").images
    biden = generate(pipe, [Person(photos["biden"])], output_type="np").images
    surprised = generate(pipe, [Person(photos["obama"], expression="surprised")], output_type="np").images
    assert not np.array_equal(obama, biden)
    assert not np.array_equal(obama, surprised)


def test_id_scale_zero_with_zero_lora_equals_plain_stable_diffusion(weights, reference_analyzer, photos):
    pipe = make_pipeline(weights["ours"], reference_analyzer)
    for processor in saa_processors(pipe.unet).values():
        for lora in (processor.to_q_lora, processor.to_k_lora, processor.to_v_lora, processor.to_out_lora):
            torch.nn.init.zeros_(lora.up.weight)
    people = [Person(photos["obama"], expression="happy"), Person(photos["biden"])]
    ours = generate(pipe, people, id_scale=0.0, output_type="np", height=64, width=96, seed=3).images

    base = load_base_model("tiny-random")
    expected = plain_images(base, pipe.scheduler, "two friends in a cafe", height=64, width=96, steps=STEPS, seed=3)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    with_id = generate(pipe, people, output_type="np", height=64, width=96, seed=3).images
    assert np.abs(with_id - expected).max() > 1e-3


def test_release_files_generate_the_same_pixels_as_our_format(weights, reference_analyzer, photos, pipe):
    release_pipe = make_pipeline(weights["release"], reference_analyzer)
    assert release_pipe.dynamicid.format == "release"
    assert release_pipe.dynamicid.can_edit
    people = [Person(photos["obama"], expression="surprised"), Person(photos["biden"], expression="happy")]
    from_release = generate(release_pipe, people, output_type="np", height=64, width=96).images
    from_ours = generate(pipe, people, output_type="np", height=64, width=96).images
    assert from_release.shape == (1, 64, 96, 3)
    np.testing.assert_allclose(from_release, from_ours, atol=1e-6, rtol=0)


def test_release_without_imr_generates_but_refuses_edits(weights, reference_analyzer, photos):
    files = weights["release"]
    pipe = make_pipeline(ReleaseFiles(saa=files.saa), reference_analyzer)
    assert generate(pipe, [Person(photos["obama"])]).images[0].size == (64, 64)
    with pytest.raises(ValueError, match="no imr and no keypoint_encoder"):
        generate(pipe, [Person(photos["obama"], expression="happy")])


def test_activation_maps_follow_the_boxes(pipe, photos):
    left, right = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
    people = [Person(photos["obama"], box=left), Person(photos["biden"], box=right)]
    out = generate(pipe, people, height=64, width=96, return_activation_maps=True, num_images_per_prompt=2)
    maps = out.activation_maps
    assert maps.shape == (2, 2, 64, 96)
    assert maps.min() >= 0 and maps.max() <= 1
    # Inside a person's box the other person's tokens are masked out (beyond the upsampling seam).
    assert maps[:, 1, :, :40].max() == 0
    assert maps[:, 0, :, 56:].max() == 0
    assert maps[:, 0, :, :40].max() > 0 and maps[:, 1, :, 56:].max() > 0
    assert generate(pipe, people).activation_maps is None


def test_callback_sees_every_step_and_can_replace_latents(pipe, photos):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = generate(
        pipe, [Person(photos["obama"])], num_inference_steps=3, callback_on_step_end=callback, output_type="latent"
    )
    assert [s for s, _ in seen] == [0, 1, 2]
    assert seen[0][1] == (1, 4, 8, 8)
    assert torch.count_nonzero(out.images) == 0


def test_several_faces_warn_and_the_largest_is_used(pipe, photos):
    with pytest.warns(DynamicIDWarning, match="2 faces in reference of person 1"):
        out = generate(pipe, [Person(photos["two_people"])])
    assert out.people[0]["reference"]["faces_found"] == 2


def test_overlapping_boxes_warn(pipe, photos):
    people = [Person(photos["obama"], box=(0, 0, 1, 0.6)), Person(photos["biden"], box=(0, 0.4, 1, 1))]
    with pytest.warns(DynamicIDWarning, match="overlap; person 2 is in front"):
        generate(pipe, people)


def _refuses_before_denoising(pipe, people, error, match, **kwargs):
    steps = []
    with pytest.raises(error, match=match):
        generate(pipe, people, callback_on_step_end=lambda *a: steps.append(a[1]) or {}, **kwargs)
    assert steps == []


@pytest.mark.parametrize(
    ("people_spec", "kwargs", "error", "match"),
    [
        ([("obama", (0.1, 0.1, 1.2, 0.5))], {}, ValueError, r"outside \[0, 1\]"),
        ([("obama", (0.1, 0.1, 0.9, 0.5)), ("biden", None)], {}, ValueError, "1 box.* for 2 people"),
        ([("obama", None)], {"height": 60}, ValueError, "divisible by 8"),
        ([("obama", (0.2, 0.2, 0.6, 0.6)), ("biden", (0.1, 0.1, 0.9, 0.9))], {}, ValueError, "person 1 would not"),
        ([("dog", None)], {}, NoFaceError, "no face found in reference of person 1 .*dog.jpg"),
        ([("zero_bytes", None)], {}, ImageLoadError, "zero_bytes.jpg"),
    ],
    ids=["box-outside", "fewer-boxes", "size", "box-hidden", "no-face", "unreadable"],
)
def test_bad_inputs_are_refused_before_denoising(pipe, photos, people_spec, kwargs, error, match):
    people = [Person(photos[name], box=box) for name, box in people_spec]
    _refuses_before_denoising(pipe, people, error, match, **kwargs)


def test_unknown_expression_lists_the_valid_ones(pipe, photos):
    match = "person 1: unknown expression 'smug'; valid: afraid, angry, disgusted, happy, neutral, sad, surprised"
    _refuses_before_denoising(pipe, [Person(photos["obama"], expression="smug")], ValueError, match)
    _refuses_before_denoising(pipe, [Person(photos["obama"], pose="upside down")], ValueError, "valid: fully turned")


def test_weights_for_another_base_are_refused(tmp_path, reference_analyzer):
    from dynamicid.models import FaceEncoder
    from dynamicid.models.checkpoints import save_dynamicid
    from dynamicid.schemas import CheckpointMetadata

    encoder = FaceEncoder(
        cross_attention_dim=768, id_embeddings_dim=reference_analyzer.embedding_dim, clip_embeddings_dim=48
    )
    metadata = CheckpointMetadata(
        cross_attention_dim=768, id_embed_dim=reference_analyzer.embedding_dim, clip_embed_dim=48
    )
    path = save_dynamicid(tmp_path / "sd15.safetensors", metadata=metadata, face_encoder=encoder)
    pipe = DynamicIDPipeline.from_base(load_base_model("tiny-random"))
    with pytest.raises(ValueError, match="cross_attention_dim=768, but the target has cross_attention_dim=32"):
        pipe.load_dynamicid(path, face_analyzer=reference_analyzer)


def test_from_pretrained_reads_a_diffusers_folder_with_its_scheduler(tmp_path, weights, reference_analyzer, photos):
    base = load_base_model("tiny-random")
    StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=base.image_encoder,
        requires_safety_checker=False,
    ).save_pretrained(tmp_path / "sd")
    pipe = DynamicIDPipeline.from_pretrained(tmp_path / "sd")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.id_adapter is None
    pipe.load_dynamicid(weights["ours"], face_analyzer=reference_analyzer)
    pipe.set_progress_bar_config(disable=True)
    assert generate(pipe, [Person(photos["obama"])]).images[0].size == (64, 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DynamicIDPipeline.from_pretrained(tmp_path / "missing")


def test_landmark_image_and_pose_targets(pipe, photos):
    pose = "fully turned to the left"
    people = [Person(photos["obama"], landmark_image=photos["biden"]), Person(photos["biden"], pose=pose)]
    out = generate(pipe, people, output_type="np")
    first, second = out.people
    assert first["edited"] and first["landmark_image"] == str(photos["biden"])
    # Without text targets, the landmark image's own labels are the target.
    landmark_labels = generate(pipe, [Person(photos["biden"])]).people[0]["reference"]
    assert (first["target_expression"], first["target_pose"]) == (
        landmark_labels["expression"],
        landmark_labels["pose"],
    )
    assert second["target_pose"] == pose and second["target_expression"] == second["reference"]["expression"]
    plain = generate(pipe, [Person(photos["obama"]), Person(photos["biden"])], output_type="np")
    assert not np.array_equal(out.images, plain.images)


def test_missing_parts_are_named(tmp_path, weights, reference_analyzer):
    from dynamicid.models.checkpoints import load_dynamicid, save_dynamicid

    ours = load_dynamicid(weights["ours"])
    face_only = save_dynamicid(
        tmp_path / "face.safetensors", metadata=ours.metadata, face_encoder=ours.build_face_encoder()
    )
    pipe = DynamicIDPipeline.from_base(load_base_model("tiny-random"))
    with pytest.raises(ValueError, match=r"hold.* no saa .*parts found: face_encoder"):
        pipe.load_dynamicid(face_only, face_analyzer=reference_analyzer)

    saa_only = tmp_path / "SAA.bin"
    torch.save({"SAA_module": torch.load(weights["release"].saa, weights_only=True)["SAA_module"]}, saa_only)
    with pytest.raises(ValueError, match=r"lack face_encoder.*face_encoder: missing"):
        pipe.load_dynamicid(ReleaseFiles(saa=saa_only), face_analyzer=reference_analyzer)


def test_modules_in_memory_generate_what_their_saved_file_generates(pipe, reference_analyzer, photos):
    base = load_base_model("tiny-random")
    parts = random_parts(base, reference_analyzer)
    in_memory = DynamicIDPipeline.from_base(base)
    in_memory.set_dynamicid(parts.face_encoder, parts.imr, parts.keypoint_encoder, face_analyzer=reference_analyzer)
    in_memory.set_progress_bar_config(disable=True)
    people = [Person(photos["obama"], expression="sad"), Person(photos["biden"])]
    expected = generate(pipe, people, output_type="np").images
    np.testing.assert_array_equal(generate(in_memory, people, output_type="np").images, expected)
    bare = DynamicIDPipeline.from_base(load_base_model("tiny-random"))
    with pytest.raises(ValueError, match="install_saa"):
        bare.set_dynamicid(parts.face_encoder, face_analyzer=reference_analyzer)
