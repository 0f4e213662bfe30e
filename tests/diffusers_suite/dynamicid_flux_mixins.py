"""diffusers' own Flux pipeline test mixins (v0.40.0's pytest-style `tests/pipelines/testing_utils`, the ones its
`tests/pipelines/flux/test_pipeline_flux.py` composes for FluxPipeline) against DynamicIDFluxPipeline, with the
tiny-random-flux parts, random FAKE DynamicID weights and one real reference photo; diffusers' FluxPipeline on
the same parts runs the same mixins as the control.

Not collected by the project's pytest: `tests/test_infer_diffusers_suite.py` copies this file into an unpacked copy
of `../shared/vendor/diffusers-tests-v0.40.0.tar.gz` as `tests/pipelines/dynamicid/test_dynamicid_flux.py` and
runs it there, beside `dynamicid_mixins.py` (as `test_dynamicid.py`), whose face analyzer and reference it uses.
"""

from importlib.metadata import version

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from packaging.version import Version

from dynamicid.infer import Person
from dynamicid.infer.pipeline_flux import DynamicIDFluxPipeline
from dynamicid.infer.references import ReferenceAnalyzer
from dynamicid.models.adapter import DynamicIDAdapter
from dynamicid.testing import build_tiny_random_flux, random_parts

from ..testing_utils import (
    BasePipelineTesterConfig,
    FasterCacheTesterMixin,
    FirstBlockCacheTesterMixin,
    LoraTesterMixin,
    MagCacheTesterMixin,
    MemoryTesterMixin,
    PipelineTesterMixin,
    PyramidAttentionBroadcastTesterMixin,
    TaylorSeerCacheTesterMixin,
)
from .test_dynamicid import ANALYZER, REFERENCE  # the SD adapter's copy beside this one (one thread, the face)

# The pipeline needs its image encoder (the face encoder reads CLIP states); diffusers' test drops every optional
# component, and image_encoder is optional only so that a Flux base folder (which has none) loads.
NEEDS_IMAGE_ENCODER = "optional components: DynamicID generates with its image_encoder, which this test sets to None"
OUT_OF_TREE = "looks the pipeline class up in diffusers.pipelines; cannot apply to an out-of-tree pipeline"


def base_components(num_layers: int = 2, num_single_layers: int = 2) -> tuple[dict, object]:
    """tiny-random-flux's parts under diffusers' names; the cache mixins ask for other depths."""
    base = build_tiny_random_flux(seed=0)
    transformer = base.denoiser
    if (num_layers, num_single_layers) != (transformer.config.num_layers, transformer.config.num_single_layers):
        torch.manual_seed(0)
        config = dict(transformer.config, num_layers=num_layers, num_single_layers=num_single_layers)
        transformer = FluxTransformer2DModel.from_config(config).eval()
        base.denoiser = transformer
    parts = {
        "scheduler": base.noise_scheduler,
        "vae": base.vae,
        "text_encoder": base.text_encoder,
        "tokenizer": base.tokenizer,
        "text_encoder_2": base.text_encoder_2,
        "tokenizer_2": base.tokenizer_2,
        "transformer": transformer,
        "image_encoder": base.image_encoder,
        "feature_extractor": None,
    }
    return parts, base


class FluxConfig(BasePipelineTesterConfig):
    pipeline_class = FluxPipeline
    required_input_params_in_call_signature = frozenset(
        ["prompt", "height", "width", "guidance_scale", "prompt_embeds", "pooled_prompt_embeds"]
    )
    batch_input_params = frozenset(["prompt"])
    output_shape = (3, 32, 32)

    def get_dummy_components(self, num_layers: int = 2, num_single_layers: int = 2):
        return base_components(num_layers, num_single_layers)[0] | {"image_encoder": None}

    def get_dummy_inputs(self):
        return {
            "prompt": "A painting of a squirrel eating a burger",
            "generator": self.get_generator(0),
            "num_inference_steps": 2,
            "guidance_scale": 5.0,
            "height": 32,
            "width": 32,
            "max_sequence_length": 48,
            "output_type": "pt",
        }


class DynamicIDFluxConfig(FluxConfig):
    pipeline_class = DynamicIDFluxPipeline

    def get_dummy_components(self, num_layers: int = 2, num_single_layers: int = 2):
        parts, base = base_components(num_layers, num_single_layers)
        fake = random_parts(base, ANALYZER)
        adapter = DynamicIDAdapter.from_modules(
            fake.face_encoder, parts["transformer"], fake.imr, fake.keypoint_encoder, ANALYZER.embedding_model
        )
        return parts | {"id_adapter": adapter}

    def get_dummy_inputs(self):
        return super().get_dummy_inputs() | {"people": [Person(REFERENCE)]}

    def get_pipeline(self, **components):
        pipe = super().get_pipeline(**components)
        pipe.reference_analyzer = ReferenceAnalyzer(ANALYZER)  # face analysis is not a component
        return pipe


class DynamicIDFluxPipelineSkips:
    """PipelineTesterMixin's two tests that cannot apply to DynamicIDFluxPipeline (the reasons)."""

    @pytest.mark.skip(reason=NEEDS_IMAGE_ENCODER)
    def test_save_load_optional_components(self):
        pass

    @pytest.mark.skip(reason=OUT_OF_TREE)
    def test_encode_prompt_works_in_isolation(self):
        pass


# The mixins diffusers' test_pipeline_flux.py composes for FluxPipeline, one class each (its IP-Adapter class
# tests diffusers' FluxIPAdapterMixin, a loader neither pipeline under test here adds to).
MIXINS = {
    "Pipeline": PipelineTesterMixin,
    "Memory": MemoryTesterMixin,
    "PyramidAttentionBroadcast": PyramidAttentionBroadcastTesterMixin,
    "FasterCache": FasterCacheTesterMixin,
    "FirstBlockCache": FirstBlockCacheTesterMixin,
    "TaylorSeerCache": TaylorSeerCacheTesterMixin,
    "MagCache": MagCacheTesterMixin,
    "LoRA": LoraTesterMixin,
}
FASTER_CACHE_CONFIG = {  # as diffusers' Flux test: FLUX.1-dev is guidance-distilled
    "spatial_attention_block_skip_range": 2,
    "spatial_attention_timestep_skip_range": (-1, 901),
    "unconditional_batch_skip_range": 2,
    "attention_weight_callback": lambda _: 0.5,
    "is_guidance_distilled": True,
}

# diffusers 0.42's LoRA loader refuses peft < 0.22 (every LoRA test of both pipelines fails in add_adapter), and no
# newer peft than the lock's 0.21.2 is published here: the LoRA classes run once the lock moves.
OLD_PEFT = Version(version("peft")) < Version("0.22.0")
NEEDS_PEFT = f"environment: diffusers' LoRA loader needs peft >= 0.22, installed {version('peft')}"

for _name, _mixin in MIXINS.items():
    for _prefix, _config in (("TestDynamicIDFlux", DynamicIDFluxConfig), ("TestControlFlux", FluxConfig)):
        _attributes = {"FASTER_CACHE_CONFIG": FASTER_CACHE_CONFIG} if _name == "FasterCache" else {}
        _skips = (DynamicIDFluxPipelineSkips,) if (_prefix, _name) == ("TestDynamicIDFlux", "Pipeline") else ()
        _class = type(f"{_prefix}{_name}", (*_skips, _config, _mixin), _attributes)
        if _name == "LoRA":
            _class = pytest.mark.skipif(OLD_PEFT, reason=NEEDS_PEFT)(_class)
        globals()[f"{_prefix}{_name}"] = _class
