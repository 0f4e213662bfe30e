"""DynamicID's parts for ComfyUI: the weights as loaded once (`DynamicIDParts`) and a person's face tokens.

Everything here calls the project's public API: the weights loaders (`dynamicid.models.checkpoints`), the face
analysis (`dynamicid.infer.references`), and the identity-token steps of the DynamicID pipeline
(`DynamicIDMixin.encode_faces` / `reconfigure`), run here with ComfyUI's CLIP for the face-prompt vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynamicid.faces import FaceAnalyzer
from dynamicid.infer.people import Person, check_person_labels
from dynamicid.infer.pipeline import DynamicIDMixin
from dynamicid.infer.references import Reference, ReferenceAnalyzer
from dynamicid.infer.weights import DynamicIDModules
from dynamicid.models import DynamicIDWeights, ReleaseCheckpoint, load_dynamicid, load_release_checkpoint
from dynamicid.models.base import load_image_encoder
from dynamicid.models.checkpoints import check_base_family, identity_processors
from dynamicid.models.conditioning import Conditioner
from dynamicid.models.families import family_named
from dynamicid.models.saa import SAAProcessor
from dynamicid.models.saa_flux import FluxSAAProcessor

from .flux_patch import flux_skeleton
from .model_patch import install_processors, model_family, unet_skeleton

RELEASE_FAMILY = "sd15"  # the authors' release was trained on SD 1.5


@dataclass
class DynamicIDParts:
    """What the loader node outputs: the weights read once, the CLIP image encoder and the face analysis."""

    weights: DynamicIDWeights | ReleaseCheckpoint
    modules: DynamicIDModules
    image_encoder: torch.nn.Module
    references: ReferenceAnalyzer
    name: str

    @property
    def family(self) -> str:
        return self.weights.metadata.base_family if isinstance(self.weights, DynamicIDWeights) else RELEASE_FAMILY

    def processors(self, model: Any) -> dict[str, SAAProcessor | FluxSAAProcessor]:
        """The SAA processors for a ComfyUI MODEL (diffusers names: a UNet's attention layers or a Flux
        transformer's double-stream blocks), weights loaded strictly; one line if the weights were made for
        another base family or width."""
        family = model_family(model)
        check_base_family(self.family, family, self.name)
        skeleton = flux_skeleton(model) if family == "flux" else unet_skeleton(model)
        rank = (
            self.weights.lora_rank if isinstance(self.weights, ReleaseCheckpoint) else self.weights.metadata.lora_rank
        )
        width = self.modules.face_encoder.cross_attention_dim  # a UNet's is fixed; Flux's is the weights' own
        install_processors(skeleton, rank=rank, num_tokens=self.modules.num_tokens, token_dim=width)
        found = family_named(family).token_dim(skeleton)
        if found != width:
            raise ValueError(
                f"{self.name} was made for cross_attention_dim={width} but the MODEL has {found}; use weights "
                "trained on this base model"
            )
        self.weights.load_saa_into(skeleton)
        return dict(identity_processors(skeleton))


def load_parts(
    weights: list[Path], image_encoder: Path, face_backend: str, insightface_root: Path | None = None
) -> DynamicIDParts:
    """Our safetensors file(s), or the release's `.bin` files (SAA first, then IMR and keypoint encoder)."""
    name = ", ".join(p.name for p in weights)
    if weights[0].suffix == ".safetensors":
        loaded: DynamicIDWeights | ReleaseCheckpoint = load_dynamicid(weights)
        parts = loaded.state_dicts
        id_embed_model = loaded.metadata.id_embed_model
    else:
        loaded = load_release_checkpoint(*weights)
        parts = loaded.state_dicts
        id_embed_model = "arcface-buffalo_l"
    missing = [p for p in ("face_encoder", "saa") if p not in parts]
    if missing:
        raise ValueError(f"{name} hold(s) no {' and no '.join(missing)}; DynamicID needs the anchoring weights")
    modules = DynamicIDModules(
        loaded.build_face_encoder(),
        loaded.build_imr() if "imr" in parts else None,
        loaded.build_keypoint_encoder() if "keypoint_encoder" in parts else None,
        id_embed_model,
        {f"weights[{i}]": p for i, p in enumerate(weights)},
        "release" if isinstance(loaded, ReleaseCheckpoint) else "dynamicid",
    )
    encoder = load_image_encoder(image_encoder)
    if modules.face_encoder.clip_embeddings_dim != encoder.config.hidden_size:
        raise ValueError(
            f"{name} takes {modules.face_encoder.clip_embeddings_dim}-d CLIP states but the image encoder "
            f"{image_encoder.name} gives {encoder.config.hidden_size}-d; use the image encoder the weights were trained with"
        )
    options = {"insightface_root": str(insightface_root)} if insightface_root is not None else {}
    references = ReferenceAnalyzer(FaceAnalyzer(face_backend, **options))
    if modules.face_encoder.id_embeddings_dim != references.embedding_dim:
        raise ValueError(
            f"{name} takes {modules.face_encoder.id_embeddings_dim}-d ID embeddings but the {face_backend} face "
            f"backend gives {references.embedding_dim}-d ({references.embedding_model}); choose the backend the "
            "weights were trained with"
        )
    return DynamicIDParts(loaded, modules, encoder, references, name)


class ComfyConditioner(Conditioner):
    """The CLIP image encoder of the DynamicID parts, and ComfyUI's CLIP for the IMR's face-prompt vectors (the
    pooled text output: CLIP-L's for SD 1.5 and FLUX.1, the projected CLIP-G one for SDXL, as the diffusers
    pipelines use)."""

    def __init__(self, image_encoder: torch.nn.Module, clip: Any | None):
        super().__init__(tokenizer=None, text_encoder=None, image_encoder=image_encoder)
        self.clip = clip

    def face_prompt_vectors(self, prompts: list[str]) -> torch.Tensor:
        if self.clip is None:
            raise ValueError("an expression/pose edit needs the checkpoint's CLIP: connect it to the person node")
        pooled = [self.clip.encode_from_tokens(self.clip.tokenize(p), return_pooled=True)[1] for p in prompts]
        return torch.cat(pooled).float()


class FaceTokens(DynamicIDMixin):
    """The DynamicID pipeline's identity-token steps over the loaded parts, without a diffusers pipeline."""

    def __init__(self, parts: DynamicIDParts, clip: Any | None):
        self.dynamicid = parts.modules
        self.reference_analyzer = parts.references
        self._conditioner = ComfyConditioner(parts.image_encoder, clip)

    @property
    def conditioner(self) -> Conditioner:
        return self._conditioner


@dataclass
class PersonTokens:
    """What a person node outputs: the face's tokens (conditional and unconditional) and what was found."""

    cond: torch.Tensor  # (num_tokens, C)
    uncond: torch.Tensor
    reference: Reference
    report: dict[str, Any]


def person_tokens(parts: DynamicIDParts, person: Person, clip: Any | None) -> PersonTokens:
    """Analyse the reference (largest face), encode it, and rewrite the tokens with the IMR if asked to."""
    check_person_labels(person, 0)
    if person.wants_edit and not parts.modules.can_edit:
        raise ValueError(
            f"an expression/pose edit needs the IMR and keypoint encoder, which {parts.name} lack(s); "
            "load the reconfiguration weights (for the release: the IMR and keypoint-encoder files)"
        )
    faces = FaceTokens(parts, clip)
    reference = faces.analyze(person.image, role="reference image")
    tokens, uncond = faces.encode_faces([reference])
    report = {"reference": reference.labels(), "edited": person.wants_edit}
    if person.wants_edit:
        report |= faces.reconfigure(tokens, reference, person, 0)
    return PersonTokens(tokens[0], uncond[0], reference, report)


def to_pil(image: torch.Tensor) -> Image.Image:
    """The first image of a ComfyUI IMAGE batch (B, H, W, C) in [0, 1]."""
    array = (image[0, ..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def to_image(picture: Image.Image) -> torch.Tensor:
    """A ComfyUI IMAGE batch of one (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]
