"""Reconfiguration: train IMR + the keypoint encoder; UNet, SAA and face encoder frozen (METHOD.md "Training").

A sample is one identity: a source row and K target rows. IMR rewrites the source's cached face tokens towards
each target's landmark vector (keypoint encoder over the landmark map) and face-prompt vector (pooled CLIP text).
Loss = dfm_weight * MSE(pred tokens, target tokens)  ("DFM")
     + ldc_weight * MSE(UNet(noisy target latents, t, text + pred tokens), UNet(same, text + target tokens))  ("LDC"),
with the fixed UNet prompt schemas.RECONFIGURE_UNET_PROMPT. Both parts are logged separately. The conditioning
(pooled face-prompt text, landmark vectors, the IMR edit, [text ; ID]) comes from `dynamicid.models.conditioning`
and the run from `dynamicid.train.runner.run_stage`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dynamicid.infer import Person
from dynamicid.models import IMR, KeypointEncoder, load_dynamicid
from dynamicid.models.base import BaseModel
from dynamicid.models.checkpoints import check_base_family
from dynamicid.models.conditioning import TRAINING_SAA, Conditioner, edit_tokens, landmark_vectors
from dynamicid.models.families import detect_family
from dynamicid.schemas import RECONFIGURE_UNET_PROMPT
from dynamicid.train.cache_prompts import PromptCache, run_prompts
from dynamicid.train.cache_tokens import file_digest, read_tokens
from dynamicid.train.config import ReconfigureConfig
from dynamicid.train.data import RECONFIGURE_COLUMNS, IdentitySamples, collate_identities, load_curated
from dynamicid.train.eval_hook import ManifestEvaluation
from dynamicid.train.noise import vae_latents
from dynamicid.train.runner import Stage, cast_frozen, check_output_dir, one_writer, run_stage, start_stage
from dynamicid.train.validation import row_reference, sample_image, training_pipeline


class Reconfigurator(nn.Module):
    """Keypoint encoder + IMR: one forward rewrites the tokens of every identity of a batch."""

    def __init__(self, imr: IMR, keypoint_encoder: KeypointEncoder):
        super().__init__()
        self.imr = imr
        self.keypoint_encoder = keypoint_encoder

    def forward(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each item: tokens (1+K, n, C) source first, landmark_maps (1+K, 1, 96, 96), text (1+K, txt)."""
        maps = torch.cat([item["landmark_maps"] for item in items])
        landmarks = landmark_vectors(self.keypoint_encoder, maps).split([len(item["landmark_maps"]) for item in items])
        return [
            edit_tokens(self.imr, item["tokens"][:1], vectors, item["text"])
            for item, vectors in zip(items, landmarks, strict=True)
        ]


class ReconfigureObjective:
    """A batch of identities -> (DFM, LDC) and their weighted sum, with the fixed UNet prompt.

    With `prompts` (a `PromptCache`) the UNet prompt's embeddings and the face-prompt vectors come from it."""

    def __init__(
        self, base: BaseModel, config: ReconfigureConfig, dtype: torch.dtype, prompts: PromptCache | None = None
    ):
        self.base, self.config, self.dtype, self.prompts = base, config, dtype, prompts
        self.objective = base.base_family.objective(base.noise_scheduler)  # LDC's noisy latents and timesteps
        self.conditioner = Conditioner.from_parts(base)
        size = (config.resolution, config.resolution)
        if prompts is None:
            text, self.added_cond_kwargs = self.conditioner.text_condition(
                self.conditioner.token_ids([RECONFIGURE_UNET_PROMPT]), size
            )
        else:
            device = base.denoiser.device  # where the live text encoders would have put it
            embeddings = {k: v.to(device) for k, v in prompts.batch([RECONFIGURE_UNET_PROMPT]).items()}
            text, self.added_cond_kwargs = self.conditioner.condition_from(embeddings, size)
        self.unet_text = text.to(dtype)
        self.text_vectors: dict[str, torch.Tensor] = {}  # pooled face-prompt vectors (35 prompts at most)

    def face_prompt_vectors(self, prompts: list[str]) -> torch.Tensor:
        new = sorted(set(prompts) - set(self.text_vectors))
        if new:
            encode = self.conditioner.face_prompt_vectors if self.prompts is None else self.prompts.face_vectors
            self.text_vectors.update(zip(new, encode(new).float(), strict=True))
        return torch.stack([self.text_vectors[p] for p in prompts])

    def __call__(
        self, model: nn.Module, items: list[dict[str, Any]], generator: torch.Generator, training: bool
    ) -> dict[str, torch.Tensor]:
        device = self.unet_text.device
        inputs = [
            {
                "tokens": item["tokens"].to(device),
                "landmark_maps": item["landmark_maps"].to(device),
                "text": self.face_prompt_vectors(item["face_prompts"]).to(device),
            }
            for item in items
        ]
        predicted = torch.cat(model(inputs))
        targets = torch.cat([item["tokens"][1:] for item in items]).to(device)
        dfm = F.mse_loss(predicted.float(), targets.float())

        pixels = torch.cat([item["pixel_values"] for item in items])
        noised = self.objective.noised(vae_latents(self.base, pixels, generator), generator)
        noisy, timesteps = noised.noisy, noised.timesteps
        text = self.unet_text.expand(len(targets), -1, -1)
        family, denoiser = self.base.base_family, self.base.denoiser
        inputs = (noisy, timesteps, text)
        with torch.no_grad():
            reference = family.denoise(denoiser, *inputs, targets.to(self.dtype), self.added_cond_kwargs, TRAINING_SAA)
        prediction = family.denoise(denoiser, *inputs, predicted.to(self.dtype), self.added_cond_kwargs, TRAINING_SAA)
        ldc = F.mse_loss(prediction.float(), reference.float())
        total = self.config.dfm_weight * dfm + self.config.ldc_weight * ldc
        return {"loss": total, "dfm": dfm, "ldc": ldc}


@one_writer
def train_reconfigure(config: ReconfigureConfig, base: BaseModel | None = None) -> Path:
    """Run (or resume) the reconfiguration stage; returns RUN/weights.safetensors (IMR + keypoint encoder).

    `base`: an already loaded base model (without SAA); default: load `config.base_model`.
    """
    # 1. Inputs, checked before any model loads.
    check_output_dir(config)
    dataset = load_curated(config.dataset, RECONFIGURE_COLUMNS)
    anchor = load_dynamicid(config.anchor)
    for part in ("saa", "face_encoder"):
        if part not in anchor.metadata.parts:
            raise ValueError(f"--anchor {config.anchor} holds no {part}: give the anchoring run's weights.safetensors")
    family = base.family if base is not None else detect_family(config.base_model).name
    check_base_family(anchor.metadata.base_family, family, f"--anchor {config.anchor}")
    tokens = read_tokens(config.tokens, dataset, config.anchor)
    prompts = run_prompts(config)

    # 2. Accelerator and models (UNet, SAA and face encoder frozen; IMR and keypoint encoder trained).
    accelerator, dtype, base = start_stage(config, base)
    objective = base.base_family.objective(base.noise_scheduler).name
    if anchor.metadata.prediction_type != objective:
        raise ValueError(
            f"--anchor {config.anchor} was trained with prediction_type {anchor.metadata.prediction_type!r} but "
            f"the base model's scheduler says {objective!r}; anchor and reconfigure on the same base model"
        )
    anchor.load_saa_into(base.denoiser)
    base.denoiser.requires_grad_(False)
    if config.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
    md = anchor.metadata
    imr = IMR(
        dim=config.imr_dim,
        dim_head=config.imr_dim_head,
        heads=config.imr_heads,
        num_queries=md.num_tokens,
        embedding_dim=md.cross_attention_dim,
        txt_dim=base.pooled_dim if prompts is None else prompts.face_dim,
        depth=config.imr_depth,
    )
    model = Reconfigurator(imr, KeypointEncoder(md.cross_attention_dim, width=config.keypoint_width))
    cast_frozen(base, model, accelerator.device, dtype, config.base_dtype)
    model.to(accelerator.device)
    face_encoder = anchor.build_face_encoder().to(accelerator.device)  # frozen: sample images and benchmark

    # 3. The stage: samples, loss, what is saved, sample images and benchmark; then the shared loop.
    samples = IdentitySamples(dataset, tokens, config.resolution, config.targets_per_identity, config.seed)
    fixed = IdentitySamples(dataset, tokens, config.resolution, config.targets_per_identity, config.seed + 7919)
    bench = ManifestEvaluation(config, base, accelerator) if config.eval_manifest else None

    def sample_images(trained: Reconfigurator) -> list[Image.Image]:
        """The first evaluation identity's source rewritten towards its targets' landmarks and face prompts."""
        source, targets = fixed.draw(0)
        reference = row_reference(dataset[source], source)
        with training_pipeline(base, accelerator, face_encoder, trained.imr, trained.keypoint_encoder) as pipe:
            return [
                sample_image(pipe, RECONFIGURE_UNET_PROMPT, [Person(reference, landmark_image=target)], config)
                for target in (row_reference(dataset[t], t) for t in targets[: config.num_validation_images])
            ]

    stage = Stage(
        name="reconfigure",
        model=model,
        samples=samples,
        losses=ReconfigureObjective(base, config, dtype, prompts),
        eval_samples=fixed,
        metadata=dataclasses.replace(
            md,
            imr_depth=config.imr_depth,
            imr_dim=config.imr_dim,
            keypoint_dim=md.cross_attention_dim,
            source=f"anchor:{Path(config.anchor).name}:{file_digest(config.anchor)}",
        ),
        saved_parts=lambda trained: {"imr": trained.imr, "keypoint_encoder": trained.keypoint_encoder},
        batch_rows=lambda items: torch.cat([item["rows"] for item in items]),
        collate_fn=collate_identities,
        sample_images=sample_images,
        bench=(lambda step, trained: bench(step, face_encoder, trained.imr, trained.keypoint_encoder))
        if bench
        else None,
    )
    return run_stage(accelerator, config, stage)
