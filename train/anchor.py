"""Anchoring: train SAA + the face encoder on single-person images with the base family's diffusion MSE.

Everything else is frozen (UNet base weights, VAE, text encoder, CLIP image encoder). Gating is on with one box
covering the image; per sample the text, the ID, or both are dropped (METHOD.md "Training"). The target is the
base's objective's (`dynamicid.models.objectives`: the noise, v, or flow matching's noise - x0). The UNet's
conditioning comes from `dynamicid.models.conditioning` (as at inference) and the run from
`dynamicid.train.runner.run_stage`: this file says what is trained, the batch -> loss function and what is saved.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dynamicid.infer import Person
from dynamicid.models import (
    FaceEncoder,
    load_dynamicid,
    load_ip_adapter_faceid,
    load_release_checkpoint,
)
from dynamicid.models.base import BaseModel
from dynamicid.models.checkpoints import check_base_family, read_safetensors, safetensors_header
from dynamicid.models.conditioning import TRAINING_SAA, Conditioner
from dynamicid.models.families import denoiser_family, detect_family
from dynamicid.models.families.flux import FLUX
from dynamicid.models.xlabs import PARTS as XLABS_PARTS
from dynamicid.models.xlabs import XLabsIPAdapter, is_xlabs_layout
from dynamicid.schemas import CheckpointMetadata
from dynamicid.train.cache_prompts import PromptCache, run_prompts
from dynamicid.train.config import AnchorConfig
from dynamicid.train.data import ANCHOR_COLUMNS, AnchorSamples, embedding_info, load_curated
from dynamicid.train.eval_hook import ManifestEvaluation
from dynamicid.train.noise import vae_latents
from dynamicid.train.runner import Stage, cast_frozen, check_output_dir, one_writer, run_stage, start_stage
from dynamicid.train.validation import row_reference, sample_image, training_pipeline


class AnchorModel(nn.Module):
    """Face encoder -> ID tokens beside the text states -> the SAA denoiser's prediction (`family.denoise`)."""

    def __init__(self, unet: nn.Module, face_encoder: FaceEncoder):
        super().__init__()
        self.unet = unet  # the family's denoiser (saved as the `unet` part: its SAA processors)
        self.face_encoder = face_encoder
        self.family = denoiser_family(unet)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        id_embeds: torch.Tensor,
        clip_embeds: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        id_tokens = self.face_encoder(id_embeds, clip_embeds)
        return self.family.denoise(
            self.unet, noisy_latents, timesteps, text, id_tokens, added_cond_kwargs, TRAINING_SAA
        )


@dataclass
class StartingWeights:
    """What `--init-from` holds, read before any model is built."""

    source: str  # recorded in the weights' metadata
    loader: Any  # DynamicIDWeights, ReleaseCheckpoint or XLabsIPAdapter: build_face_encoder(), load_saa_into(unet)
    parts: list[str]


def read_init(path: str | Path, num_tokens: int, lora_rank: int = 0) -> StartingWeights:
    """Our safetensors, the release's SAA .bin (weights only), an IP-Adapter FaceID-Plus(V2) checkpoint or XLabs'
    Flux IP-Adapter (.safetensors, recognised by its tensor names; `lora_rank`: the run's, its LoRA starts fresh)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: file not found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    header, names = safetensors_header(path) if path.suffix == ".safetensors" else ({}, [])
    if "format_version" in header:  # ours
        weights = load_dynamicid(path, num_tokens=num_tokens)
        return StartingWeights(f"dynamicid:{path.name}:{digest}", weights, weights.metadata.parts)
    if is_xlabs_layout(names):  # only then are its tensors read (a FaceID file is read by its own loader)
        xlabs = XLabsIPAdapter(path, read_safetensors(path)[1], num_tokens=num_tokens, lora_rank=lora_rank)
        return StartingWeights(f"xlabs-ip-adapter:{path.name}:{digest}", xlabs, XLABS_PARTS)
    try:
        found = load_ip_adapter_faceid(path, num_tokens=num_tokens)
        return StartingWeights(f"ip-adapter-faceid:{path.name}:{digest}", found, found.present)
    except ValueError:
        found = load_release_checkpoint(saa_bin=path, num_tokens=num_tokens)
        if "saa" not in found.present:
            raise ValueError(f"--init-from {path}: no SAA weights found:\n{found.report()}") from None
        return StartingWeights(f"release:{path.name}:{digest}", found, found.present)


def build_face_encoder(base: BaseModel, config: AnchorConfig, id_dim: int, init: StartingWeights | None) -> FaceEncoder:
    if init is not None and isinstance(init.loader, XLabsIPAdapter):  # part of an encoder: the rest at the run's widths
        return init.loader.build_face_encoder(id_embeddings_dim=id_dim, clip_embeddings_dim=base.clip_dim)
    if init is not None and "face_encoder" in init.parts:
        encoder = init.loader.build_face_encoder()
        if encoder.id_embeddings_dim != id_dim:
            raise ValueError(
                f"--init-from weights were made for id_embed_dim={encoder.id_embeddings_dim}, but the dataset's "
                f"embeddings have width {id_dim}; curate with the matching face backend or drop --init-from"
            )
        return encoder
    return FaceEncoder(
        cross_attention_dim=base.cross_attention_dim,
        id_embeddings_dim=id_dim,
        clip_embeddings_dim=base.clip_dim,
        num_tokens=config.num_tokens,
    )


def check_init_metadata(init: StartingWeights, config: AnchorConfig, id_dim: int) -> None:
    """Compare our weights' metadata with the run before loading the base model (names the field).

    IP-Adapter's and the release's files carry no metadata: loading them into the denoiser checks their layout;
    XLabs' files fit FLUX.1 only, FaceID's and the release's a UNet only."""
    family, where = detect_family(config.base_model).name, f"--init-from {config.init_from}"
    metadata = getattr(init.loader, "metadata", None)
    if isinstance(init.loader, XLabsIPAdapter):
        check_base_family(FLUX.name, family, where)
    elif metadata is None and family == FLUX.name:
        raise ValueError(
            f"{where} holds IP-Adapter FaceID or release weights, made for a Stable Diffusion UNet; a FLUX.1 base "
            "starts from this project's Flux weights or XLabs' Flux IP-Adapter (.safetensors)"
        )
    if metadata is None:
        return
    check_base_family(metadata.base_family, family, where)
    if "face_encoder" in init.parts and metadata.id_embed_dim != id_dim:
        raise ValueError(
            f"--init-from weights were made for id_embed_dim={metadata.id_embed_dim} ({metadata.id_embed_model}), "
            f"but the dataset's embeddings have width {id_dim}; curate with the matching face backend"
        )
    if "saa" in init.parts and metadata.lora_rank != config.lora_rank:
        raise ValueError(
            f"--init-from weights have lora_rank={metadata.lora_rank}, the run --lora-rank {config.lora_rank}"
        )


def anchor_metadata(
    base: BaseModel, config: AnchorConfig, id_model: str, id_dim: int, source: str, face_encoder: FaceEncoder
):
    return CheckpointMetadata(
        base_family=base.family,
        prediction_type=base.base_family.objective(base.noise_scheduler).name,
        cross_attention_dim=base.cross_attention_dim,
        lora_rank=config.lora_rank,
        num_tokens=config.num_tokens,
        id_embed_model=id_model,
        id_embed_dim=id_dim,
        clip_embed_dim=base.clip_dim,
        face_proj_dim=face_encoder.proj_dim,
        source=source,
    )


class AnchorObjective:
    """A batch -> the MSE between the SAA UNet's prediction, conditioned on [caption ; face tokens], and the base's
    objective's target (the noise for epsilon, v for v_prediction).

    In training, per sample the text (-> the empty prompt), the ID (-> the unconditional face) or both are dropped
    with the probabilities `drops` = (text only, ID only, both). With `prompts` (a `PromptCache`) the batch holds
    the captions' cached embeddings (`prompt`) instead of token ids, and a dropped text is the cached empty prompt.
    """

    def __init__(
        self,
        base: BaseModel,
        dtype: torch.dtype,
        drops: tuple[float, float, float] = (0.0, 0.0, 0.0),
        prompts: PromptCache | None = None,
    ):
        self.base, self.dtype, self.drops, self.prompts = base, dtype, drops, prompts
        self.objective = base.base_family.objective(base.noise_scheduler)
        self.conditioner = Conditioner.from_parts(base)
        self.empty_ids = self.conditioner.token_ids([""])

    def inputs(self, batch: dict[str, torch.Tensor], generator: torch.Generator, training: bool) -> dict[str, Any]:
        """Noisy latents, the target, timesteps and the (in training partly dropped) conditions of one batch."""
        noised = self.objective.noised(vae_latents(self.base, batch["pixel_values"], generator), generator)
        drop_text, keep_id = None, None
        if training and sum(self.drops) > 0:
            drop_text_p, drop_id_p, drop_both_p = self.drops
            draw = torch.rand(len(batch["pixel_values"]), generator=generator)
            only_text = draw < drop_text_p
            only_id = (draw >= drop_text_p) & (draw < drop_text_p + drop_id_p)
            both = (draw >= drop_text_p + drop_id_p) & (draw < drop_text_p + drop_id_p + drop_both_p)
            drop_text = only_text | both
            keep_id = ~(only_id | both)
        id_embeds, clip_embeds = self.conditioner.face_encoder_inputs(
            batch["clip_pixel_values"], batch["id_embeds"], keep_id
        )
        size = tuple(batch["pixel_values"].shape[-2:])
        text, added_cond_kwargs = self.text_condition(batch, drop_text, size)
        return {
            "noisy_latents": noised.noisy,
            "target": noised.target,
            "timesteps": noised.timesteps,
            "text": text.to(self.dtype),
            "id_embeds": id_embeds,
            "clip_embeds": clip_embeds,
            "added_cond_kwargs": added_cond_kwargs,
        }

    def text_condition(self, batch: dict[str, Any], drop: torch.Tensor | None, size: tuple[int, int]) -> Any:
        """The denoiser's text condition of the batch's captions, the empty prompt where `drop` is True."""
        if self.prompts is None:
            input_ids = batch["input_ids"]
            if drop is not None:
                input_ids = torch.where(
                    drop.to(input_ids.device)[:, None], self.empty_ids.to(input_ids.device), input_ids
                )
            return self.conditioner.text_condition(input_ids, size)
        embeddings = batch["prompt"]
        if drop is not None:
            empty = self.prompts.embeddings("")
            embeddings = {
                key: torch.where(
                    drop.to(value.device).view(-1, *[1] * (value.dim() - 1)), empty[key].to(value.device), value
                )
                for key, value in embeddings.items()
            }
        return self.conditioner.condition_from(embeddings, size)

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, training: bool
    ) -> dict[str, torch.Tensor]:
        inputs = self.inputs(batch, generator, training)
        target = inputs.pop("target")
        return {"loss": F.mse_loss(model(**inputs).float(), target.float())}


@one_writer
def train_anchor(config: AnchorConfig, base: BaseModel | None = None) -> Path:
    """Run (or resume) the anchoring stage; returns RUN/weights.safetensors.

    `base`: an already loaded base model to train on (its UNet gets SAA); default: load `config.base_model`.
    """
    # 1. Inputs, checked before any model loads.
    check_output_dir(config)
    dataset = load_curated(config.dataset, ANCHOR_COLUMNS)
    id_model, id_dim = embedding_info(dataset, config.dataset)
    init = read_init(config.init_from, config.num_tokens, config.lora_rank) if config.init_from else None
    if init is not None:
        check_init_metadata(init, config, id_dim)
    prompts = run_prompts(config)

    # 2. Accelerator and models (frozen base; SAA and face encoder trained).
    accelerator, dtype, base = start_stage(config, base)
    unet = base.denoiser
    if init is not None and "saa" in init.parts:
        init.loader.load_saa_into(unet)
        rank = next(iter(unet.attn_processors.values())).rank
        if rank != config.lora_rank:
            raise ValueError(f"--init-from SAA weights have LoRA rank {rank}, the run --lora-rank {config.lora_rank}")
    else:
        base.base_family.install_identity_attention(unet, rank=config.lora_rank, num_tokens=config.num_tokens)
    face_encoder = build_face_encoder(base, config, id_dim, init)
    if init is not None and isinstance(init.loader, XLabsIPAdapter):
        accelerator.print(init.loader.report())
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = AnchorModel(unet, face_encoder)
    cast_frozen(base, model, accelerator.device, dtype, config.base_dtype)

    # 3. The stage: samples, loss, what is saved, sample images and benchmark; then the shared loop.
    samples = AnchorSamples(dataset, Conditioner.from_parts(base).token_ids, config.resolution, prompts)
    bench = ManifestEvaluation(config, base, accelerator) if config.eval_manifest else None

    def sample_images(trained: AnchorModel) -> list[Image.Image]:
        """The first references, each with its own caption (one person: the whole image is its box)."""
        rows = [(i, dataset[i]) for i in range(min(config.num_validation_images, len(dataset)))]
        with training_pipeline(base, accelerator, trained.face_encoder) as pipe:
            return [sample_image(pipe, row["caption"], [Person(row_reference(row, i))], config) for i, row in rows]

    stage = Stage(
        name="anchor",
        model=model,
        samples=samples,
        losses=AnchorObjective(base, dtype, (config.drop_text, config.drop_id, config.drop_both), prompts),
        eval_samples=samples,
        metadata=anchor_metadata(base, config, id_model, id_dim, init.source if init else "random", face_encoder),
        saved_parts=lambda trained: {"face_encoder": trained.face_encoder, "unet": trained.unet},
        batch_rows=lambda batch: batch["index"],
        sample_images=sample_images,
        bench=(lambda step, trained: bench(step, trained.face_encoder)) if bench else None,
    )
    return run_stage(accelerator, config, stage)
