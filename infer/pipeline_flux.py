"""`DynamicIDFluxPipeline`: DynamicID on FLUX.1-dev, several identities in boxes with per-person expressions.

diffusers' `FluxPipeline` with DynamicID's steps: the face tokens (face encoder, rewritten by the IMR for a
target expression / pose) travel to the transformer's double-stream attention in `joint_attention_kwargs`
(`{"saa": SAACall, "id_tokens": ...}`, `dynamicid.models.saa_flux`), one `SAACall` per denoising step so the
gate boost lasts the first `boost_steps` steps. FLUX.1-dev is guidance-distilled: `guidance_scale` is the
transformer's guidance embedding (3.5 by default), not classifier-free guidance; `true_cfg_scale` > 1 with a
`negative_prompt` adds a second, negative call per step whose ID tokens are the unconditional face's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import replace_example_docstring
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from dynamicid.infer.people import Person
from dynamicid.infer.pipeline import DynamicIDMixin, DynamicIDPipelineOutput, example_docstring
from dynamicid.infer.weights import DynamicIDModules, ReleaseFiles, WeightsSource
from dynamicid.models.adapter import DynamicIDAdapter
from dynamicid.models.base import BaseModel
from dynamicid.models.conditioning_flux import FluxConditioner
from dynamicid.models.families.flux import FLUX, T5_MAX_LENGTH, load_flux_transformer
from dynamicid.models.saa_flux import (
    flux_saa_activation_maps,
    flux_saa_id_attention_probs,
    flux_saa_processors,
)

DEFAULT_STEPS = 28  # FLUX.1-dev's usual sampling: 28 flow-matching Euler steps, guidance 3.5
DEFAULT_GUIDANCE = 3.5

EXAMPLE_DOC_STRING = example_docstring(
    "DynamicIDFluxPipeline",
    '"models/FLUX.1-dev", torch_dtype=torch.bfloat16',
    "dynamicid-flux.safetensors",
    ("(0.1, 0.1, 0.6, 0.45)", "(0.1, 0.55, 0.6, 0.9)"),
    1024,
)


class DynamicIDFluxPipeline(DynamicIDMixin, FluxPipeline):
    r"""DynamicID on FLUX.1 (dev; schnell works with `guidance_scale` ignored and fewer steps).

    Components are those of [`FluxPipeline`] (transformer, 16-channel VAE, CLIP and T5 text encoders, the
    flow-matching scheduler) plus `id_adapter` (DynamicID's weights, its SAA on the double-stream blocks);
    `image_encoder` is the CLIP vision tower whose penultimate states feed the face encoder. Face analysis, face
    tokens, IMR edits, `save_pretrained` and `from_pipe` are `DynamicIDMixin`'s, shared with SD 1.5 and SDXL.
    """

    family = FLUX.name
    multi_person_boost = (2.0, 7)  # the release's boost over its first 12 of 50 steps, as a share of 28 steps
    _callback_tensor_inputs = ["latents", "prompt_embeds"]  # noqa: RUF012 (diffusers' convention)
    _optional_components = ["image_encoder", "feature_extractor"]  # noqa: RUF012 (FluxPipeline's)
    plain_processor = FluxAttnProcessor

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        id_adapter: DynamicIDAdapter | None,  # required, as on SD: diffusers saves only required or optional parts
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: Any = None,
    ):
        parts = (scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer, image_encoder)
        super().__init__(*parts, feature_extractor)
        self._adopt(id_adapter)

    # ---- construction ----

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, transformer: str | Path | Any | None = None, **kwargs: Any
    ):
        """Load a local FLUX.1 diffusers folder (nothing is downloaded), or one `save_pretrained` wrote;
        `transformer` may replace its transformer with a single `.safetensors` file (BFL's `flux1-dev.safetensors`
        layout or diffusers') or a module."""
        if isinstance(transformer, (str, Path)):
            transformer = load_flux_transformer(transformer, pretrained_model_name_or_path)
        if transformer is not None:
            kwargs["transformer"] = transformer
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_base(cls, base: BaseModel):
        """A pipeline over a Flux base's parts (`load_base_model`, also the tiny-random-flux FAKE), sampling with
        the flow-matching scheduler of its config."""
        if base.base_family is not FLUX:
            raise ValueError(
                f"base model {base.name} is {base.base_family.describe()}: use pipeline_for(base), not {cls.__name__}"
            )
        return cls(**base.components(), id_adapter=None, scheduler=base.noise_scheduler)

    def load_identity_modules(self, weights: WeightsSource) -> DynamicIDModules:
        if isinstance(weights, (ReleaseFiles, Mapping)):
            raise ValueError("a Flux base loads this project's safetensors weights only (the release is SD 1.5)")
        return super().load_identity_modules(weights)

    def check_identity_attention(self) -> None:
        """Refuse to generate when a double-stream block's SAA processor was replaced."""
        if not self.id_adapter.attached_to(self.transformer):
            raise ValueError(
                "the transformer's double-stream attention processors were replaced, so SAA would not inject the "
                "identities; put SAA back with pipe.id_adapter.attach(pipe.transformer)"
            )

    @property
    def id_token_width(self) -> int:
        """The face tokens' width: the SAA processors' (the transformer's width unless installed otherwise)."""
        return next(iter(flux_saa_processors(self.transformer).values())).id_dim

    @property
    def conditioner(self) -> FluxConditioner:
        return FluxConditioner.from_parts(self, self._max_sequence_length)

    _max_sequence_length = T5_MAX_LENGTH

    # ---- checks ----

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # 2x2 latent patches

    @property
    def native_size(self) -> int:
        return self.default_sample_size * self.vae_scale_factor

    check_inputs = FluxPipeline.check_inputs  # diffusers' own (the mixin's is SD's); DynamicID's: check_identity_inputs

    # ---- generation ----

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        people: list[Person] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        sigmas: list[float] | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = T5_MAX_LENGTH,
        id_scale: float = 1.0,
        gating: bool = True,
        boost: float | None = None,
        boost_steps: int | None = None,
        return_activation_maps: bool = False,
    ) -> DynamicIDPipelineOutput | tuple:
        r"""Generate images of `people` as described by `prompt`; FluxPipeline's arguments plus DynamicID's.

        Args:
            prompt: the scene (a list: one batch entry per prompt, every one with the same people); prompt_2: T5's
                prompt where it differs (FluxPipeline's). people: one `Person` per identity, in order (reference
                photo, optional target expression / pose / landmark image, optional box (y0, x0, y1, x1) in
                [0, 1]; none = strips).
            negative_prompt, negative_prompt_2, true_cfg_scale: true classifier-free guidance (two transformer
                calls per step, the negative one with the unconditional face's tokens) when `true_cfg_scale` > 1
                and a negative prompt is given; off by default, as for FLUX.1-dev.
            height, width: pixels, multiples of 16 (default 1024). num_inference_steps: Euler steps (28);
                sigmas: a custom schedule (as FluxPipeline).
            guidance_scale: FLUX.1-dev's distilled guidance embedding (3.5).
            num_images_per_prompt: images per prompt. generator, latents: reproducible / preset noise (latents
                packed, as FluxPipeline takes them).
            prompt_embeds, pooled_prompt_embeds (and the negative ones): text states instead of the prompts.
            output_type: "pil", "np", "pt" or "latent". return_dict: False returns (images,).
            joint_attention_kwargs: passed to the attention processors with this step's SAA inputs (e.g.
                {"scale": 0.5} for a loaded LoRA's weight).
            callback_on_step_end: fn(pipe, step, timestep, tensors) after each step; it may replace the tensors
                named in `callback_on_step_end_tensor_inputs`.
            max_sequence_length: T5 tokens of the prompt (512).
            id_scale: weight of the identity branch (0 = Flux alone). gating: SAA's gating and box routing.
            boost, boost_steps: gate boost inside the boxes and for how many steps; None = 2.0 for the first 7
                of 28 steps' share with several people, none for one.
            return_activation_maps: also return per-person SAA activation maps (see the output class).

        Examples:

        Returns:
            `DynamicIDPipelineOutput` (or a tuple when return_dict is False).
        """
        clock = time.perf_counter()
        timings: dict[str, float] = {}
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 0. Default height and width (FLUX.1's 1024)
        height = height or self.native_size
        width = width or self.native_size

        # 1. Check inputs before any model runs: DynamicID's (people, size, scales, SAA in place), then Flux's
        boxes = self.check_identity_inputs(
            people, height, width, guidance_scale, id_scale, num_images_per_prompt, joint_attention_kwargs
        )
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}")
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            tensor_inputs,
            max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        if self.dynamicid.format != "memory":  # loaded modules follow pipe.to(...); a trainer's stay as they are
            self.dynamicid.to(device, self.transformer.dtype)
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1 and has_negative

        # 2. Analyse the references: the largest face of each
        references = [self.analyze(p.image, role=f"reference of person {i + 1}") for i, p in enumerate(people)]
        timings["analysis"] = _lap(clock)

        # 3. Encode the prompt (and the negative one under true CFG): T5 states, CLIP's pooled vector, text ids,
        # each with FluxPipeline's own encode_prompt
        text = {"device": device, "num_images_per_prompt": num_images_per_prompt}
        text |= {"max_sequence_length": max_sequence_length, "lora_scale": self._joint_attention_kwargs.get("scale")}
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt, prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, **text
        )
        if do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
                negative_prompt,
                negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds,
                **text,
            )
        num_images = prompt_embeds.shape[0]

        # 4. Face tokens, rewritten by the IMR where an expression / pose / landmark target is given
        tokens, uncond_tokens, reports = self.identity_tokens(people, references, boxes)
        id_tokens = tokens.reshape(1, -1, tokens.shape[-1]).to(self.transformer.dtype)
        uncond_id_tokens = uncond_tokens.reshape(1, -1, tokens.shape[-1]).to(self.transformer.dtype)
        timings["tokens"] = _lap(clock) - timings["analysis"]

        # 5. Packed initial noise and the image position ids
        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(
            num_images, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents
        )

        # 6. Timesteps: sigmas 1 .. 1/steps shifted by mu, which grows with the image's token count (Flux's shift)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu
        )
        self._num_timesteps = len(timesteps)

        # 7. SAA inputs for this layout, one per denoising step: the boost lasts the first `boost_steps` steps
        saa_settings = self.saa_settings(boxes, id_scale, gating, boost, boost_steps)
        saa_per_step, maps = self.saa_steps(
            saa_settings, num_inference_steps, (height, width), num_images, return_activation_maps
        )

        # 8. Denoising loop: the guidance embedding is read each step (a callback may change it)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                guidance = None
                if self.transformer.config.guidance_embeds:
                    guidance = torch.full([num_images], self.guidance_scale, device=device, dtype=torch.float32)
                # (diffusers' cache hooks, e.g. First Block Cache, keep one state per named context, as FluxPipeline)
                calls = {"cond": (prompt_embeds, pooled_prompt_embeds, id_tokens, saa_per_step[i])}
                if do_true_cfg:  # the negative call: the unconditional face, no maps recorded
                    negative_call = replace(saa_per_step[i], return_activation_maps=False)
                    calls["uncond"] = (
                        negative_prompt_embeds,
                        negative_pooled_prompt_embeds,
                        uncond_id_tokens,
                        negative_call,
                    )
                predictions = []
                for context, (states, pooled_states, ids, call) in calls.items():
                    with self.transformer.cache_context(context):
                        prediction = self.transformer(
                            hidden_states=latents,
                            timestep=timestep / 1000,
                            guidance=guidance,
                            pooled_projections=pooled_states,
                            encoder_hidden_states=states,
                            txt_ids=text_ids,
                            img_ids=latent_image_ids,
                            joint_attention_kwargs={**self._joint_attention_kwargs, "saa": call, "id_tokens": ids},
                            return_dict=False,
                        )[0]
                    predictions.append(prediction)
                    if maps is not None and call.return_activation_maps:
                        transformer = self.transformer
                        maps.add(flux_saa_activation_maps(transformer), flux_saa_id_attention_probs(transformer))
                noise_pred = predictions[0]
                if do_true_cfg:
                    noise_pred = predictions[1] + true_cfg_scale * (predictions[0] - predictions[1])
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_outputs = (
                        callback_on_step_end(self, i, t, {k: callback_kwargs[k] for k in tensor_inputs}) or {}
                    )
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()
        self._current_timestep = None
        timings["denoise"] = _lap(clock) - timings["analysis"] - timings["tokens"]

        # 9. Decode: unpack the 2x2 patches, undo the VAE's scaling and shift
        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        output = self.finish(image, reports, maps, (height, width), saa_settings, timings, clock)
        return output if return_dict else (image,)


def _lap(start: float) -> float:
    return time.perf_counter() - start
