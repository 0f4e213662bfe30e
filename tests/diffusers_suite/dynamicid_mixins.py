"""diffusers' own pipeline test mixins (v0.40.0's test suite) against DynamicID's pipelines, with the project's
tiny-random parts, random FAKE DynamicID weights and one real reference photo.

Not collected by the project's pytest: `tests/test_infer_diffusers_suite.py` copies this file into an unpacked
copy of `../shared/vendor/diffusers-tests-v0.40.0.tar.gz` as `tests/pipelines/dynamicid/test_dynamicid.py` (the
mixins import from that tree) and runs it there. The plain diffusers pipelines of the same families run the same
mixins on the same parts as controls. Environment: DYNAMICID_REFERENCE = a photo with one face.
"""

import os
import unittest

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from dynamicid.faces import FaceAnalyzer
from dynamicid.infer import DynamicIDPipeline, DynamicIDXLPipeline, Person
from dynamicid.infer.references import ReferenceAnalyzer
from dynamicid.models.adapter import DynamicIDAdapter
from dynamicid.testing import build_tiny_random, random_parts

from ..pipeline_params import (
    TEXT_TO_IMAGE_BATCH_PARAMS,
    TEXT_TO_IMAGE_CALLBACK_CFG_PARAMS,
    TEXT_TO_IMAGE_IMAGE_PARAMS,
    TEXT_TO_IMAGE_PARAMS,
)
from ..test_pipelines_common import (
    PipelineKarrasSchedulerTesterMixin,
    PipelineLatentTesterMixin,
    PipelineTesterMixin,
    SDFunctionTesterMixin,
)

torch.set_num_threads(1)  # tiny models: a second thread gains nothing (see tests/conftest.py)
ANALYZER = FaceAnalyzer("embedded")
REFERENCE = ReferenceAnalyzer(ANALYZER).analyze(os.environ["DYNAMICID_REFERENCE"])
# It reads diffusers' own source of the pipeline class (an AST walk of `encode_prompt`'s return names) and builds
# the pipeline with every non-text component None; an out-of-tree pipeline that needs its face parts cannot.
OUT_OF_TREE = "reads diffusers' source tree for the pipeline class; cannot apply to an out-of-tree pipeline"


def base_components(name: str) -> dict:
    """The tiny-random base's parts under diffusers' names, DDIM sampler, no safety checker."""
    base = build_tiny_random(name, seed=0)
    parts = {
        "vae": base.vae,
        "text_encoder": base.text_encoder,
        "tokenizer": base.tokenizer,
        "unet": base.unet,
        "scheduler": DDIMScheduler.from_config(base.noise_scheduler.config),
        "image_encoder": base.image_encoder,
        "feature_extractor": None,
    }
    if base.text_encoder_2 is not None:
        parts |= {"text_encoder_2": base.text_encoder_2, "tokenizer_2": base.tokenizer_2}
    else:
        parts["safety_checker"] = None
    return parts, base


def dynamicid_components(name: str) -> dict:
    parts, base = base_components(name)
    fake = random_parts(base, ANALYZER)
    adapter = DynamicIDAdapter.from_modules(
        fake.face_encoder, base.unet, fake.imr, fake.keypoint_encoder, ANALYZER.embedding_model
    )
    return parts | {"id_adapter": adapter}


def text_inputs(seed: int) -> dict:
    return {
        "prompt": "A painting of a squirrel eating a burger",
        "generator": torch.Generator(device="cpu").manual_seed(seed),
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "output_type": "np",
    }


class MixinConfig(
    SDFunctionTesterMixin,
    PipelineLatentTesterMixin,
    PipelineKarrasSchedulerTesterMixin,
    PipelineTesterMixin,
):
    params = TEXT_TO_IMAGE_PARAMS
    batch_params = TEXT_TO_IMAGE_BATCH_PARAMS
    image_params = TEXT_TO_IMAGE_IMAGE_PARAMS
    image_latents_params = TEXT_TO_IMAGE_IMAGE_PARAMS
    callback_cfg_params = TEXT_TO_IMAGE_CALLBACK_CFG_PARAMS
    test_layerwise_casting = True  # fp8 storage with bf16 compute on the UNet
    base_name = "tiny-random"

    def get_dummy_components(self):
        return base_components(self.base_name)[0]

    def get_dummy_inputs(self, device, seed=0):
        return text_inputs(seed)

    @unittest.skip(OUT_OF_TREE)
    def test_encode_prompt_works_in_isolation(self):
        pass


class DynamicIDConfig(MixinConfig):
    def get_dummy_components(self):
        return dynamicid_components(self.base_name)

    def get_dummy_inputs(self, device, seed=0):
        return text_inputs(seed) | {"people": [Person(REFERENCE)]}


class TestDynamicIDPipeline(DynamicIDConfig, unittest.TestCase):
    pipeline_class = DynamicIDPipeline


class TestDynamicIDXLPipeline(DynamicIDConfig, unittest.TestCase):
    pipeline_class = DynamicIDXLPipeline
    base_name = "tiny-random-sdxl"


class TestControlStableDiffusionPipeline(MixinConfig, unittest.TestCase):
    pipeline_class = StableDiffusionPipeline

    def get_dummy_components(self):
        parts = base_components(self.base_name)[0]
        return parts | {"image_encoder": None}


class TestControlStableDiffusionXLPipeline(MixinConfig, unittest.TestCase):
    pipeline_class = StableDiffusionXLPipeline
    base_name = "tiny-random-sdxl"

    def get_dummy_components(self):
        parts = base_components(self.base_name)[0]
        return parts | {"image_encoder": None}

    @unittest.skip("as diffusers' own SDXL test: its optional components include both text encoders")
    def test_save_load_optional_components(self):
        pass
