"""`DynamicIDPipeline` (SD 1.5) and `DynamicIDXLPipeline` (SDXL): text-to-image with several identities, each in
its own box, each with an optional target expression / pose (METHOD.md: SAA, IMR, reference settings).

Both are `DynamicIDMixin` combined with diffusers' pipeline of the family; `pipeline_for(base)` picks the one
of a loaded base model."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, replace_example_docstring
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from dynamicid.faces import FaceAnalyzer, render_landmark_map
from dynamicid.infer.outputs import MAX_IMAGE_SIDE
from dynamicid.infer.people import Box, ImageSource, Person, check_person_labels, describe_source, resolve_boxes
from dynamicid.infer.references import LANDMARK_FRAME, Reference, ReferenceAnalyzer
from dynamicid.infer.weights import DynamicIDModules, WeightsSource, load_modules
from dynamicid.models import saa_activation_maps, saa_id_attention_probs
from dynamicid.models.adapter import DynamicIDAdapter
from dynamicid.models.base import BaseModel, load_image_encoder
from dynamicid.models.checkpoints import identity_processors
from dynamicid.models.conditioning import Conditioner, edit_tokens, encoder_states, landmark_vectors, saa_calls
from dynamicid.models.families import family_named, folder_family
from dynamicid.schemas import face_prompt

# Reference settings of the release (METHOD.md): 50 DDIM steps, guidance 5; several people get the gate
# boosted (infer_scale 2) during the first 12 denoising steps, one person none.
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
MULTI_PERSON_BOOST = (2.0, 12)
SINGLE_PERSON_BOOST = (0.0, 0)


def example_docstring(pipeline: str, load: str, weights: str, boxes: tuple[str, str], size: int) -> str:
    """The `Examples:` section of a family's `__call__` docstring: two people in boxes, two expressions."""
    return f"""
    Examples:
        ```py
        >>> from dynamicid.infer import {pipeline}, Person

        >>> pipe = {pipeline}.from_pretrained({load})
        >>> pipe.load_dynamicid("{weights}", image_encoder="models/image_encoder")
        >>> out = pipe(
        ...     "two friends laughing in a cafe",
        ...     people=[
        ...         Person("ref1.jpg", expression="happy", box={boxes[0]}),
        ...         Person("ref2.jpg", expression="surprised", box={boxes[1]}),
        ...     ],
        ...     height={size},
        ...     width={size},
        ...     generator=torch.Generator().manual_seed(2025),
        ... )
        >>> out.images[0].save("friends.png")
        ```
"""


EXAMPLE_DOC_STRING = example_docstring(
    "DynamicIDPipeline",
    '"models/stable-diffusion-v1-5"',
    "dynamicid.safetensors",
    ("(0.1, 0.1, 0.5, 0.4)", "(0.1, 0.6, 0.5, 0.9)"),
    768,
)


@dataclass
class DynamicIDPipelineOutput(BaseOutput):
    """Output of `DynamicIDPipeline`.

    Args:
        images: the generated images (PIL list, or an array for output_type "np").
        people: per person: the labels found on the reference, the target labels, the box, whether the IMR ran.
        activation_maps: with return_activation_maps=True, float32 (num_images, num_people, height, width) in
            [0, 1]: where each identity's tokens were injected (SAA gate x that person's ID attention, averaged
            over layers and steps, upsampled to the image).
        timings: seconds spent per stage (analysis, tokens, denoise, decode).
        saa: the layout settings the SAA processors ran with (num_ids, id_scale, gating, boxes, boost, boost_steps).
    """

    images: list[PIL.Image.Image] | np.ndarray
    people: list[dict[str, Any]] = field(default_factory=list)
    activation_maps: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    saa: dict[str, Any] = field(default_factory=dict)
    nsfw_content_detected: list[bool] | None = None


class DynamicIDMixin:
    r"""DynamicID's part of a text-to-image pipeline, the same for every base family.

    Multi-person personalised generation: each person's face tokens (face encoder, rewritten by the IMR for a
    target expression / pose) are appended to the text states, and the SAA processors route them into the
    person's box. A sibling per base family (`DynamicIDPipeline` for SD 1.5, `DynamicIDXLPipeline` for SDXL,
    `DynamicIDFluxPipeline` in `pipeline_flux`) combines this mixin with diffusers' pipeline of that family, owns
    its `__call__`, and supplies what differs: `encode_text` (the UNet's text condition, and for SDXL its
    `added_cond_kwargs`) and `safety_check`; Flux overrides the hooks below (`plain_processor`,
    `load_identity_modules`, `check_identity_attention`, `size_multiple`) and uses FluxPipeline's checks.

    DynamicID's weights are the `id_adapter` component (`dynamicid.models.adapter.DynamicIDAdapter`: face
    encoder, IMR, keypoint encoder and the SAA processors it puts on the denoiser), from `load_dynamicid` (or
    `set_dynamicid`, or a folder written by `save_pretrained`); the face analysis comes from
    `dynamicid.faces.FaceAnalyzer`. `from_pretrained` keeps the folder's scheduler, `from_base` uses DDIM
    (the release's sampler); any scheduler diffusers ships for SD 1.5 / SDXL works.
    """

    family: str  # the base family the sibling is made for ("sd15", "sdxl")
    multi_person_boost = MULTI_PERSON_BOOST  # (boost, steps) with several people, for the family's step count
    dynamicid: DynamicIDModules | None = None  # the adapter's modules and where they were loaded from
    reference_analyzer: ReferenceAnalyzer | None = None
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]  # noqa: RUF012 (diffusers)
    # Components DynamicID cannot generate without are required; only these may be None.
    _optional_components = ["safety_checker", "feature_extractor"]  # noqa: RUF012 (diffusers' convention)
    # The face encoder, IMR and keypoint encoder are called directly, not through the component's forward, which
    # model offloading hooks: the component stays on the execution device (its SAA part moves with the UNet).
    _exclude_from_cpu_offload = ["safety_checker", "id_adapter"]  # noqa: RUF012 (diffusers' convention)

    # ---- construction ----

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """Load a local diffusers folder (nothing is downloaded) with its own scheduler: a base model, whose
        `image_encoder` and `id_adapter` are then None until `load_dynamicid`, or a saved DynamicID pipeline."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"base model folder {folder} does not exist (expected {family_named(cls.family).label} in "
                f"diffusers layout)"
            )
        found = folder_family(folder)
        if found.name != cls.family:
            raise ValueError(
                f"{folder} holds {found.describe()}, not {family_named(cls.family).describe()}: "
                f"use {found.pipeline_class().__name__}"
            )
        index = folder / "model_index.json"
        entries = json.loads(index.read_text()) if index.is_file() else {}
        for name in ("image_encoder", "id_adapter"):
            if name not in kwargs and not (entries.get(name) or [None])[0]:
                kwargs[name] = None
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(folder, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any):
        """A DynamicID pipeline over another pipeline's components (e.g. a `StableDiffusionPipeline`'s), without
        copying them; `image_encoder` and `id_adapter` are None where that pipeline has none."""
        for name in ("image_encoder", "id_adapter"):
            if name not in kwargs and getattr(pipeline, name, None) is None:
                kwargs[name] = None
        pipe = super().from_pipe(pipeline, **kwargs)
        if pipe.id_adapter is not None and pipe.id_adapter is getattr(pipeline, "id_adapter", None):
            pipe.dynamicid, pipe.reference_analyzer = pipeline.dynamicid, pipeline.reference_analyzer
        return pipe

    @classmethod
    def from_base(cls, base: BaseModel):
        """A pipeline over `dynamicid.models.base.load_base_model(...)`'s parts (also the tiny-random FAKEs)."""
        if base.family != cls.family:
            raise ValueError(
                f"base model {base.name} is {base.base_family.describe()}: use {base.base_family.pipeline_class().__name__}, "
                f"not {cls.__name__} (or `pipeline_for(base)`)"
            )
        return cls(
            **base.components(), id_adapter=None, scheduler=DDIMScheduler.from_config(base.noise_scheduler.config)
        )

    def _adopt(self, id_adapter: DynamicIDAdapter | None) -> None:
        """Register the `id_adapter` component and put its SAA on the denoiser (construction, from_pretrained)."""
        self.register_modules(id_adapter=id_adapter)
        if id_adapter is None:
            return
        id_adapter.attach(self.denoiser)
        self.dynamicid = DynamicIDModules(
            id_adapter.face_encoder,
            id_adapter.imr,
            id_adapter.keypoint_encoder,
            id_adapter.config.id_embed_model,
            {},
            "dynamicid",
        )

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`; DynamicID's weights go to `id_adapter/` only, the denoiser is written
        without SAA (the base's own weights: diffusers' pipeline of the family loads the folder too), so the folder
        reloads with `from_pretrained` as it was."""
        if self.id_adapter is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        processors = self.denoiser.attn_processors
        self.denoiser.set_attn_processor(self.plain_processor())
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.denoiser.set_attn_processor(processors)

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """diffusers' QKV fusion with SAA kept on the UNet: SAA reads the fused projections
        (`dynamicid.models.saa_unet`); diffusers' own pipeline would put its fused processor in SAA's place."""
        if self.id_adapter is None:
            return super().fuse_qkv_projections(unet=unet, vae=vae)
        super().fuse_qkv_projections(unet=False, vae=vae)
        if unet:
            self.unet.fuse_qkv_projections()
            self.fusing_unet = True

    def load_dynamicid(
        self,
        weights: WeightsSource,
        image_encoder: str | Path | torch.nn.Module | None = None,
        face_backend: str = "auto",
        face_analyzer: FaceAnalyzer | ReferenceAnalyzer | None = None,
        **face_options: Any,
    ) -> None:
        """Load DynamicID's weights (as the `id_adapter` component), the CLIP image encoder and the face analysis.

        Args:
            weights: our safetensors file(s) (`dynamicid.models.save_dynamicid`), or the release's `.bin` files
                as `ReleaseFiles(saa=..., imr=..., keypoint_encoder=...)` or a dict with those keys.
            image_encoder: a CLIP vision folder (e.g. IP-Adapter's models/image_encoder) or module; None keeps
                the pipeline's own.
            face_backend: "auto", "embedded" or "insightface" (`dynamicid.faces.FaceAnalyzer`); face_options
                go to it (e.g. insightface_root=...). `face_analyzer` reuses an existing analyzer instead.
        """
        dtype = self.denoiser.dtype
        if image_encoder is not None:
            self.register_modules(image_encoder=load_image_encoder(image_encoder).to(self.device, dtype))
        if self.image_encoder is None:
            raise ValueError("no CLIP image encoder: pass image_encoder=DIR (a CLIP vision model folder)")
        modules = self.load_identity_modules(weights)
        modules.to(self.device, dtype)
        self._use(modules, face_analyzer or FaceAnalyzer(face_backend, **face_options))

    def set_dynamicid(
        self,
        face_encoder: torch.nn.Module,
        imr: torch.nn.Module | None = None,
        keypoint_encoder: torch.nn.Module | None = None,
        *,
        face_analyzer: FaceAnalyzer | ReferenceAnalyzer | None = None,
    ) -> None:
        """Use DynamicID modules held in memory (e.g. to sample while training); the denoiser must carry SAA.

        The modules are used as they are (device, dtype, train/eval mode): call `.eval()` on them first.
        Without `face_analyzer` every person's image (and landmark image) must be an analysed `Reference`
        (e.g. `Reference.from_crop` of a curated dataset row).
        """
        identity_processors(self.denoiser)  # raises when SAA is not installed
        if self.image_encoder is None:
            raise ValueError("no CLIP image encoder: register one (pipe.register_modules(image_encoder=...))")
        embedding_model = face_analyzer.embedding_model if face_analyzer is not None else "references"
        self._use(DynamicIDModules(face_encoder, imr, keypoint_encoder, embedding_model, {}, "memory"), face_analyzer)

    def _use(self, modules: DynamicIDModules, face_analyzer: FaceAnalyzer | ReferenceAnalyzer | None) -> None:
        """Check that the modules fit the image encoder, the base and the face backend, then keep them."""
        clip_dim = int(self.image_encoder.config.hidden_size)
        if modules.face_encoder.clip_embeddings_dim != clip_dim:
            raise ValueError(
                f"the face encoder takes {modules.face_encoder.clip_embeddings_dim}-d CLIP states but the image "
                f"encoder gives {clip_dim}-d; use the image encoder the weights were trained with"
            )
        _check_edit_modules(modules, self.id_token_width)
        references = face_analyzer
        if face_analyzer is not None and not isinstance(face_analyzer, ReferenceAnalyzer):
            references = ReferenceAnalyzer(face_analyzer)
        if references is not None and modules.face_encoder.id_embeddings_dim != references.embedding_dim:
            raise ValueError(
                f"the weights take {modules.face_encoder.id_embeddings_dim}-d ID embeddings "
                f"({modules.id_embed_model}) but the face backend gives {references.embedding_dim}-d "
                f"({references.embedding_model}); choose the face backend the weights were trained with"
            )
        self.attach_identity(modules)
        self.dynamicid, self.reference_analyzer = modules, references

    # ---- what a family's sibling may override (the UNet families' here) ----

    plain_processor: type = AttnProcessor2_0  # the family's own, in SAA's place while save_pretrained writes

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network SAA lives in: the family's UNet or transformer."""
        return getattr(self, family_named(self.family).denoiser_name)

    def load_identity_modules(self, weights: WeightsSource) -> DynamicIDModules:
        """DynamicID's modules of `weights`, SAA installed and loaded into the denoiser."""
        return load_modules(weights, self.denoiser)

    @property
    def id_token_width(self) -> int:
        """The width of the face tokens the base takes (the UNet's cross-attention width)."""
        return int(self.unet.config.cross_attention_dim)

    def attach_identity(self, modules: DynamicIDModules) -> None:
        """Keep the modules as the `id_adapter` component and put its SAA on the denoiser."""
        adapter = DynamicIDAdapter.from_modules(
            modules.face_encoder, self.denoiser, modules.imr, modules.keypoint_encoder, modules.id_embed_model
        )
        self.register_modules(id_adapter=adapter)
        adapter.attach(self.denoiser)

    def check_identity_attention(self) -> None:
        """Refuse to generate when the UNet's SAA processors were replaced."""
        if not self.id_adapter.attached_to(self.unet):
            found = sorted({type(p).__name__ for p in self.unet.attn_processors.values()})
            raise ValueError(
                f"the UNet's attention processors were replaced ({', '.join(found)}), so SAA would not inject the "
                "identities; use the pipeline's enable_attention_slicing / fuse_qkv_projections (they keep SAA) "
                "and put SAA back with pipe.id_adapter.attach(pipe.unet)"
            )

    @property
    def conditioner(self) -> Conditioner:
        """The base family's text and image encoders as DynamicID conditioning (`dynamicid.models.conditioning`)."""
        return Conditioner.from_parts(self)

    # ---- checks ----

    @property
    def size_multiple(self) -> int:
        """What height and width must be multiples of: the VAE's factor (Flux: times its 2x2 latent patches)."""
        return self.vae_scale_factor

    @property
    def native_size(self) -> int:
        """The side in pixels the base was trained at: the default height and width."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_identity_inputs(
        self,
        people: list[Person] | None,
        height: int,
        width: int,
        guidance_scale: float,
        id_scale: float,
        num_images_per_prompt: int,
        attention_kwargs: dict[str, Any] | None,
    ) -> list[Box]:
        """The checks every family's `check_inputs` makes first (weights and SAA in place, people, labels,
        edits, size, scales); returns the people's boxes (given or strips)."""
        if self.dynamicid is None:
            raise ValueError("no DynamicID weights loaded: call pipe.load_dynamicid(WEIGHTS, ...) first")
        self.check_identity_attention()
        if attention_kwargs is not None and {"saa", "id_tokens"} & set(attention_kwargs):
            raise ValueError(
                f"`{family_named(self.family).attention_kwargs}` must not hold 'saa' or 'id_tokens': the pipeline "
                "makes each step's SAA inputs from people, id_scale, gating, boost and boost_steps"
            )
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"`height` and `width` must be divisible by {multiple} but are {height} and {width}")
        if not (0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE):
            raise ValueError(f"`height` and `width` must be in 8..{MAX_IMAGE_SIDE}, got {height} and {width}")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}")
        for name, value in (("guidance_scale", guidance_scale), ("id_scale", id_scale)):
            if not (isinstance(value, int | float) and 0 <= value < math.inf):  # NaN fails this too
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
        if not people or not all(isinstance(p, Person) for p in people):
            raise ValueError("`people` must be a non-empty list of dynamicid.infer.Person")
        for i, person in enumerate(people):
            check_person_labels(person, i)
            if person.wants_edit and not self.dynamicid.can_edit:
                absent = [n for n in ("imr", "keypoint_encoder") if getattr(self.dynamicid, n) is None]
                raise ValueError(
                    f"person {i + 1} asks for an expression/pose edit but the loaded weights have no "
                    f"{' and no '.join(absent)}; load the reconfiguration stage's weights (for the release: "
                    "the IMR and keypoint-encoder files)"
                )
        return resolve_boxes(people)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        people: list[Person] | None,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        num_images_per_prompt: int = 1,
        id_scale: float = 1.0,
    ) -> list[Box]:
        """Refuse bad settings before any model runs; returns the people's boxes (given or strips)."""
        boxes = self.check_identity_inputs(
            people, height, width, guidance_scale, id_scale, num_images_per_prompt, cross_attention_kwargs
        )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give either `prompt` or `prompt_embeds`, not both and not neither")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise ValueError(
                f"`negative_prompt` must be a string, a list or None, got {type(negative_prompt).__name__}"
            )
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
        # DDIM's leading timesteps are offset by `steps_offset`: one step per training timestep would index past them.
        most_steps = self.scheduler.config.num_train_timesteps - self.scheduler.config.get("steps_offset", 0)
        if not 1 <= num_inference_steps <= most_steps:
            raise ValueError(f"`num_inference_steps` (--steps) must be in 1..{most_steps}, got {num_inference_steps}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {unknown} not in {self._callback_tensor_inputs}")
        return boxes

    # ---- identity tokens ----

    def analyze(self, source: ImageSource | Reference, role: str) -> Reference:
        """The face the pipeline uses from an image (its largest face), or an already analysed `Reference`."""
        if isinstance(source, Reference):
            return source
        if self.reference_analyzer is None:
            raise ValueError(f"no face analysis set up for {role} {describe_source(source)}: pass face_analyzer=...")
        return self.reference_analyzer.analyze(source, role=role)

    @torch.no_grad()
    def encode_landmarks(self, landmarks_512: list[np.ndarray]) -> torch.Tensor:
        """Keypoint-encoder vectors (N, emb) of landmark sets given in 512x512 face-crop pixels."""
        maps = np.stack([render_landmark_map(points, image_size=LANDMARK_FRAME) for points in landmarks_512])
        return landmark_vectors(self.dynamicid.keypoint_encoder, torch.from_numpy(maps)[:, None])

    @torch.no_grad()
    def encode_faces(self, references: list[Reference]) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional (n, tokens, C) and unconditional (n, tokens, C) face tokens of the references.

        Unconditional = the face encoder on a zero ID embedding and the CLIP states of an all-zero image.
        """
        encoder = self.dynamicid.face_encoder
        for ref in references:
            if len(ref.face.embedding) != encoder.id_embeddings_dim:
                raise ValueError(
                    f"{ref.source} has a {len(ref.face.embedding)}-d ID embedding ({ref.face.backend}) but the "
                    f"weights take {encoder.id_embeddings_dim}-d ones; use the face backend they were trained with"
                )
        weight = next(encoder.parameters())
        faces = [ref.clip_face for ref in references]
        id_embeds = torch.from_numpy(np.stack([ref.face.embedding for ref in references]).astype(np.float32))
        keep = torch.tensor([True] * len(references) + [False])  # one more row: the unconditional face
        id_embeds, clip_states = self.conditioner.face_encoder_inputs(
            [*faces, faces[0]], torch.cat([id_embeds, id_embeds[:1]]), keep
        )
        tokens = encoder(id_embeds.to(weight.device, weight.dtype), clip_states.to(weight.device, weight.dtype))
        return tokens[:-1], tokens[-1:].expand(len(references), -1, -1)

    @torch.no_grad()
    def reconfigure(self, tokens: torch.Tensor, reference: Reference, person: Person, index: int) -> dict[str, Any]:
        """Rewrite one person's tokens (1, tokens, C) in place of the reference's expression/pose (IMR)."""
        if reference.expression is None or reference.pose is None or reference.landmarks_512 is None:
            raise ValueError(
                f"the face backend gave no expression, pose or landmarks for {reference.source}; "
                "an expression/pose edit needs all three"
            )
        target_landmarks, target_ref = reference.landmarks_512, None
        if person.landmark_image is not None:
            target_ref = self.analyze(person.landmark_image, role=f"landmark image of person {index + 1}")
            if target_ref.landmarks_512 is None:
                raise ValueError(f"the face backend gave no landmarks for {target_ref.source}")
            target_landmarks = target_ref.landmarks_512
        default = target_ref if target_ref is not None and target_ref.expression is not None else reference
        target_expression = person.expression or default.expression
        target_pose = person.pose or default.pose
        prompts = [face_prompt(reference.expression, reference.pose), face_prompt(target_expression, target_pose)]
        text = self.conditioner.face_prompt_vectors(prompts)
        landmarks = self.encode_landmarks([reference.landmarks_512, target_landmarks])
        tokens.copy_(edit_tokens(self.dynamicid.imr, tokens, landmarks, text))
        return {
            "target_expression": target_expression,
            "target_pose": target_pose,
            "source_face_prompt": prompts[0],
            "target_face_prompt": prompts[1],
            "landmark_image": describe_source(person.landmark_image) if target_ref is not None else None,
        }

    # ---- step helpers (every family's __call__) ----

    @torch.no_grad()
    def identity_tokens(
        self, people: list[Person], references: list[Reference], boxes: list[Box]
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        """Face tokens (n, tokens, C), rewritten by the IMR where a person asks for an expression / pose /
        landmark target; the unconditional face's tokens (n, tokens, C); one report per person."""
        tokens, uncond_tokens = self.encode_faces(references)
        reports = []
        for i, (person, reference) in enumerate(zip(people, references, strict=True)):
            report = {"reference": reference.labels(), "box": list(boxes[i]), "edited": person.wants_edit}
            if person.wants_edit:
                report |= self.reconfigure(tokens[i : i + 1], reference, person, i)
            reports.append(report)
        return tokens, uncond_tokens, reports

    def saa_settings(
        self, boxes: list[Box], id_scale: float, gating: bool, boost: float | None, boost_steps: int | None
    ) -> dict[str, Any]:
        """The layout the SAA processors run with (reported in the output); a None boost setting takes the
        family's reference value (`multi_person_boost` with several people, none for one)."""
        default = self.multi_person_boost if len(boxes) > 1 else SINGLE_PERSON_BOOST
        return {
            "num_ids": len(boxes),
            "id_scale": id_scale,
            "gating": gating,
            "boxes": [list(box) for box in boxes],
            "boost": default[0] if boost is None else boost,
            "boost_steps": default[1] if boost_steps is None else boost_steps,
        }

    def finish(
        self,
        image: Any,
        reports: list[dict[str, Any]],
        maps: MapAccumulator | None,
        image_size: tuple[int, int],
        saa_settings: dict[str, Any],
        timings: dict[str, float],
        clock: float,
        nsfw_content_detected: list[bool] | None = None,
    ) -> DynamicIDPipelineOutput:
        """The end of `__call__` after decoding: the activation maps, the last timings, the model hooks freed."""
        activation_maps = maps.result(image_size) if maps is not None else None
        timings["decode"] = _lap(clock) - sum(timings.values())
        timings["total"] = _lap(clock)
        self.maybe_free_model_hooks()
        return DynamicIDPipelineOutput(
            images=image,
            people=reports,
            activation_maps=activation_maps,
            timings={k: round(v, 4) for k, v in timings.items()},
            saa=saa_settings,
            nsfw_content_detected=nsfw_content_detected,
        )

    def saa_steps(
        self,
        settings: dict[str, Any],
        steps: int,
        image_size: tuple[int, int],
        num_images: int,
        return_activation_maps: bool,
    ) -> tuple[list, MapAccumulator | None]:
        """Step 7 of `__call__`: one SAA input per denoising step for the layout `settings` (`saa_settings`; the
        boost lasts the first `boost_steps` steps), and the activation-map accumulator when maps are asked for."""
        per_step = saa_calls(
            **settings, steps=steps, image_size=image_size, return_activation_maps=return_activation_maps
        )
        num_people = settings["num_ids"]
        maps = MapAccumulator(num_people, self.dynamicid.num_tokens, num_images) if return_activation_maps else None
        return per_step, maps

    # ---- generation ----

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        people: list[Person] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        id_scale: float = 1.0,
        gating: bool = True,
        boost: float | None = None,
        boost_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_activation_maps: bool = False,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> DynamicIDPipelineOutput | tuple:
        r"""Generate images of `people` as described by `prompt`.

        Args:
            prompt: the scene, e.g. "two friends laughing in a cafe"; a list generates one batch entry per prompt,
                every one with the same people.
            people: one `Person` per identity, in order (reference photo, optional target expression / pose /
                landmark image, optional box (y0, x0, y1, x1) in [0, 1]; no boxes = equal vertical strips).
            negative_prompt: what to steer away from (classifier-free guidance); None = ""; a list: one per prompt.
            height, width: image size in pixels, multiples of 8 (default: the UNet's sample size x 8).
            num_inference_steps: denoising steps (reference: 50 DDIM steps). timesteps, sigmas: custom schedules
                for schedulers that take them (as `StableDiffusionPipeline`).
            guidance_scale: classifier-free guidance weight (reference: 5.0); <= 1 turns guidance off. Read at
                every step, so a `callback_on_step_end` may change `pipe._guidance_scale`.
            num_images_per_prompt: images generated per prompt.
            eta: DDIM eta. generator: torch generator(s) for reproducible noise. latents: preset noise.
            prompt_embeds, negative_prompt_embeds: text states instead of `prompt` / `negative_prompt` (the
                people's face tokens are appended to them); pooled_prompt_embeds, negative_pooled_prompt_embeds:
                SDXL's pooled text with them.
            cross_attention_kwargs: passed to the attention processors with this step's SAA inputs (e.g.
                {"scale": 0.5} for a loaded LoRA's weight).
            guidance_rescale: rescales the guided noise (Common Diffusion Noise Schedules, section 3.4).
            id_scale: weight of the identity branch (0 = the LoRA-adapted base model alone).
            gating: SAA's query-level activation gating and box routing.
            boost, boost_steps: gate boost inside the boxes and for how many denoising steps; None = the reference
                settings (2.0 for 12 steps with several people, none for one). A step is one scheduler step, so
                samplers that call the UNet more than once per step (Heun, KDPM2, PNDM) boost the same share.
            output_type: "pil", "np", "pt" or "latent". return_dict: False returns (images, nsfw flags).
            return_activation_maps: also return per-person SAA activation maps (see the output class).
            callback_on_step_end: called as fn(pipe, step, timestep, tensors) after each step; it may return
                replacements for the tensors named in `callback_on_step_end_tensor_inputs`.

        Examples:

        Returns:
            `DynamicIDPipelineOutput` (or a tuple when return_dict is False).
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 0. Default height and width to the UNet's
        height = height or self.native_size
        width = width or self.native_size

        # 1. Check inputs before any model runs
        boxes = self.check_inputs(
            prompt,
            people,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            cross_attention_kwargs,
            tensor_inputs,
            num_images_per_prompt,
            id_scale,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = None
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        batch_size = prompt_embeds.shape[0] if prompt is None else 1 if isinstance(prompt, str) else len(prompt)
        num_images = batch_size * num_images_per_prompt

        # 2. Analyse the references: the largest face of each
        references = [self.analyze(p.image, role=f"reference of person {i + 1}") for i, p in enumerate(people)]
        timings["analysis"] = _lap(clock)

        # 3. Encode the input prompt (and the family's extra UNet inputs, e.g. SDXL's pooled text and size ids)
        prompt_embeds, negative_prompt_embeds, added_cond_kwargs = self.encode_text(
            prompt,
            negative_prompt,
            device,
            num_images_per_prompt,
            (height, width),
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"),
        )

        # 4. Face tokens, rewritten by the IMR where an expression / pose / landmark target is given
        tokens, uncond_tokens, reports = self.identity_tokens(people, references, boxes)

        # 5. Text tokens followed by every person's tokens, in person order, for every prompt of the batch
        prompt_embeds = encoder_states(prompt_embeds, tokens.reshape(1, -1, tokens.shape[-1]))
        if self.do_classifier_free_guidance:
            negative_prompt_embeds = encoder_states(
                negative_prompt_embeds, uncond_tokens.reshape(1, -1, uncond_tokens.shape[-1])
            )
        timings["tokens"] = _lap(clock) - timings["analysis"]

        # 6. Timesteps and initial noise
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        latents = self.prepare_latents(
            num_images,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. SAA inputs for this layout, one per denoising step (the boost lasts the first `boost_steps` steps);
        # each UNet call takes its step's (`denoising_step`), however many calls a step makes.
        saa_settings = self.saa_settings(boxes, id_scale, gating, boost, boost_steps)
        saa_per_step, maps = self.saa_steps(
            saa_settings, num_inference_steps, (height, width), num_images, return_activation_maps
        )

        # 8. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                cfg = self.do_classifier_free_guidance
                states = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
                latent_model_input = torch.cat([latents] * 2) if cfg else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                step = denoising_step(i, len(timesteps), num_inference_steps)
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=states,
                    added_cond_kwargs=added_cond_kwargs,
                    cross_attention_kwargs={**(cross_attention_kwargs or {}), "saa": saa_per_step[step]},
                    return_dict=False,
                )[0]
                if maps is not None:
                    maps.add(saa_activation_maps(self.unet), saa_id_attention_probs(self.unet))
                if cfg:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)
                    if self.guidance_rescale > 0.0:
                        noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, self.guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in tensor_inputs}) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        timings["denoise"] = _lap(clock) - timings["analysis"] - timings["tokens"]

        # 9. Decode
        has_nsfw_concept = None
        if output_type == "latent":
            image = latents
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw_concept = self.safety_check(image, device, prompt_embeds.dtype)
            do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        output = self.finish(image, reports, maps, (height, width), saa_settings, timings, clock, has_nsfw_concept)
        return output if return_dict else (image, has_nsfw_concept)


class DynamicIDPipeline(DynamicIDMixin, StableDiffusionPipeline):
    r"""DynamicID on Stable Diffusion 1.5 (see `DynamicIDMixin`).

    Components are those of [`StableDiffusionPipeline`] plus `id_adapter` (DynamicID's weights); `image_encoder`
    is the CLIP vision tower (ViT-H/14) whose penultimate states feed the face encoder. Both are required to
    generate; `from_pretrained` on a base folder leaves them None until `load_dynamicid`.
    """

    family = "sd15"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None,
        id_adapter: DynamicIDAdapter | None,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self._adopt(id_adapter)

    def encode_text(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        size: tuple[int, int],
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        """(prompt states, negative states or None without guidance, no added UNet inputs)."""
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("pooled_prompt_embeds / negative_pooled_prompt_embeds are SDXL's; SD 1.5 takes none")
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
        )
        return prompt_embeds, negative_prompt_embeds, None

    def safety_check(self, image: torch.Tensor, device: torch.device, dtype: torch.dtype):
        return self.run_safety_checker(image, device, dtype)


class DynamicIDXLPipeline(DynamicIDMixin, StableDiffusionXLPipeline):
    r"""DynamicID on SDXL (see `DynamicIDMixin`).

    Components are those of [`StableDiffusionXLPipeline`] (two text encoders; the UNet also takes the pooled
    text and the size ids) plus `id_adapter`; `image_encoder` is the CLIP vision tower whose penultimate states
    feed the face encoder. The IMR's text vector of a face prompt is the pooled, projected output of
    `text_encoder_2`, so both text encoders are required here (diffusers' SDXL pipeline lets them be None).
    """

    family = "sdxl"
    _optional_components = ["feature_extractor"]  # noqa: RUF012 (diffusers' convention)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: CLIPVisionModelWithProjection | None,
        id_adapter: DynamicIDAdapter | None,
        feature_extractor: Any = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        self._adopt(id_adapter)

    def encode_text(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        size: tuple[int, int],
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(prompt states, negative states or None, `added_cond_kwargs`): the pooled text and the size ids
        (original = target = `size`, no crop), negative half first under guidance, as SDXL's pipeline does."""
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("SDXL's `prompt_embeds` need `pooled_prompt_embeds` too (encode_prompt returns both)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("SDXL's `negative_prompt_embeds` need `negative_pooled_prompt_embeds` too")
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
        )
        time_ids = self._get_add_time_ids(
            size, (0, 0), size, dtype=prompt_embeds.dtype, text_encoder_projection_dim=pooled.shape[-1]
        ).to(device)
        if self.do_classifier_free_guidance:
            pooled = torch.cat([negative_pooled, pooled])
        else:
            negative_prompt_embeds = None
        return (
            prompt_embeds,
            negative_prompt_embeds,
            {"text_embeds": pooled, "time_ids": time_ids.expand(len(pooled), -1)},
        )

    def safety_check(self, image: torch.Tensor, device: torch.device, dtype: torch.dtype):
        return image, None  # SDXL ships no safety checker


def pipeline_for(base: BaseModel) -> DynamicIDMixin:
    """The DynamicID pipeline of `base`'s family (`dynamicid.models.families`) over its parts."""
    return base.base_family.pipeline_class().from_base(base)


def denoising_step(call: int, num_calls: int, num_steps: int) -> int:
    """The denoising step (0 .. num_steps - 1) of the `call`-th of `num_calls` UNet calls.

    Samplers that call the UNet more than once per step (Heun and KDPM2: twice; PNDM's Runge-Kutta warm-up:
    four times) list more timesteps than steps; as diffusers' pipelines place ControlNet windows, a call belongs
    to the step at the same fraction of the schedule: floor(call * num_steps / num_calls).
    """
    return min(call * num_steps // num_calls, num_steps - 1)


def _lap(start: float) -> float:
    return time.perf_counter() - start


class MapAccumulator:
    """Sums, per layer, gate x each person's ID attention over the denoising steps (conditional half only):
    the activation maps step helper of every family's pipeline."""

    def __init__(self, num_people: int, num_tokens: int, num_images: int):
        self.num_people, self.num_tokens, self.num_images = num_people, num_tokens, num_images
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, gates: dict[str, torch.Tensor], probs: dict[str, torch.Tensor]) -> None:
        for name, layer_probs in probs.items():
            cond = layer_probs[-self.num_images :].float().mean(dim=1)  # (N, Q, n*tokens)
            per_person = cond.unflatten(-1, (self.num_people, self.num_tokens)).sum(-1)  # (N, Q, n)
            gate = gates.get(name)
            if gate is not None:
                grid = gate.shape[-2:]
                per_person = per_person * gate[-self.num_images :].float().flatten(1)[..., None]
            else:
                side = round(per_person.shape[1] ** 0.5)
                grid = (side, per_person.shape[1] // side)
            layer_map = per_person.transpose(1, 2).unflatten(-1, tuple(grid))  # (N, n, h, w)
            self.sums[name] = self.sums.get(name, 0) + layer_map

    def result(self, size: tuple[int, int]) -> np.ndarray:
        """float32 (N, n, height, width), each person's map scaled to a maximum of 1."""
        if not self.sums:
            return np.zeros((self.num_images, self.num_people, *size), dtype=np.float32)
        upsampled = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in self.sums.values()]
        mean = torch.stack(upsampled).mean(0)
        peak = mean.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
        return (mean / peak).cpu().numpy().astype(np.float32)


def _check_edit_modules(modules: DynamicIDModules, cross_attention_dim: int) -> None:
    """The IMR and keypoint encoder must work on this base's token width."""
    for name in ("imr", "keypoint_encoder"):
        module = getattr(modules, name)
        if module is not None and module.embedding_dim != cross_attention_dim:
            raise ValueError(
                f"the {name} works on {module.embedding_dim}-d tokens but the base model's cross_attention_dim "
                f"is {cross_attention_dim}; the weights were made for another base"
            )
