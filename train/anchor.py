"""Anchoring: train SAA + the face encoder on single-person images with the epsilon (diffusion) MSE.

Everything else is frozen (UNet base weights, VAE, text encoder, CLIP image encoder). Gating is on with one box
covering the image; per sample the text, the ID, or both are dropped (METHOD.md "Training").
The run order follows diffusers' train_text_to_image.py: inputs checked, Accelerator, models, freeze,
optimizer, data, prepare, resume, loop (log, evaluate, sample, checkpoint), final weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynamicid.models import (
    FaceEncoder,
    SAACall,
    install_saa,
    load_dynamicid,
    load_ip_adapter_faceid,
    load_release_checkpoint,
    load_saa_state_dict,
    save_dynamicid,
)
from dynamicid.models.base import TINY_RANDOM, BaseModel, load_base_model
from dynamicid.models.checkpoints import read_safetensors
from dynamicid.schemas import CheckpointMetadata
from dynamicid.train.conditioning import (
    clip_normalised,
    clip_states,
    noised,
    text_states,
    token_ids,
    unconditional_face_inputs,
    vae_latents,
)
from dynamicid.train.config import AnchorConfig
from dynamicid.train.data import ANCHOR_COLUMNS, AnchorSamples, embedding_info, load_curated
from dynamicid.train.eval_hook import ManifestEvaluation
from dynamicid.train.runner import (
    WEIGHTS,
    Metrics,
    Progress,
    RunState,
    check_output_dir,
    clip_and_step,
    epochs,
    make_accelerator,
    make_loader,
    make_optimizer,
    mean_over_processes,
    resume_dir,
    save_checkpoint,
    start_run,
    trainable_parameters,
    weight_dtype,
)
from dynamicid.train.validation import sample_images, save_samples

FULL_IMAGE_BOX = (0.0, 0.0, 1.0, 1.0)
TRAINING_SAA = SAACall(num_ids=1, gating=True, boxes=(FULL_IMAGE_BOX,))  # both stages train one ID, whole image


class AnchorModel(nn.Module):
    """Face encoder -> ID tokens appended to the text states -> the SAA UNet's noise prediction."""

    def __init__(self, unet: nn.Module, face_encoder: FaceEncoder):
        super().__init__()
        self.unet = unet
        self.face_encoder = face_encoder

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        id_embeds: torch.Tensor,
        clip_embeds: torch.Tensor,
    ) -> torch.Tensor:
        id_tokens = self.face_encoder(id_embeds, clip_embeds)
        states = torch.cat([text, id_tokens.to(text.dtype)], dim=1)
        return self.unet(
            noisy_latents, timesteps, encoder_hidden_states=states, cross_attention_kwargs={"saa": TRAINING_SAA}
        ).sample


@dataclass
class StartingWeights:
    """What `--init-from` holds, read before any model is built."""

    source: str  # recorded in the weights' metadata
    loader: Any  # DynamicIDWeights or ReleaseCheckpoint: build_face_encoder(), load_saa_into(unet)
    parts: list[str]


def read_init(path: str | Path, num_tokens: int) -> StartingWeights:
    """Our safetensors, the release's SAA .bin (weights only) or an IP-Adapter FaceID-Plus(V2) checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: file not found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if path.suffix == ".safetensors" and "format_version" in read_safetensors(path, tensors=False)[0]:  # ours
        weights = load_dynamicid(path, num_tokens=num_tokens)
        return StartingWeights(f"dynamicid:{path.name}:{digest}", weights, weights.metadata.parts)
    try:
        found = load_ip_adapter_faceid(path, num_tokens=num_tokens)
        return StartingWeights(f"ip-adapter-faceid:{path.name}:{digest}", found, found.present)
    except ValueError:
        found = load_release_checkpoint(saa_bin=path, num_tokens=num_tokens)
        if "saa" not in found.present:
            raise ValueError(f"--init-from {path}: no SAA weights found:\n{found.report()}") from None
        return StartingWeights(f"release:{path.name}:{digest}", found, found.present)


def build_face_encoder(base: BaseModel, config: AnchorConfig, id_dim: int, init: StartingWeights | None) -> FaceEncoder:
    if init is not None and "face_encoder" in init.parts:
        encoder = init.loader.build_face_encoder()
        if encoder.id_embeddings_dim != id_dim:
            raise ValueError(
                f"--init-from weights were made for id_embed_dim={encoder.id_embeddings_dim}, but the dataset's "
                f"embeddings have width {id_dim}; curate with the matching face backend or drop --init-from"
            )
        return encoder
    return FaceEncoder(base.cross_attention_dim, id_dim, base.clip_dim, config.num_tokens)


def check_init_metadata(init: StartingWeights, config: AnchorConfig, id_dim: int) -> None:
    """Compare our weights' metadata with the run before loading the base model (names the field)."""
    metadata = getattr(init.loader, "metadata", None)
    if metadata is None:
        return
    if "face_encoder" in init.parts and metadata.id_embed_dim != id_dim:
        raise ValueError(
            f"--init-from weights were made for id_embed_dim={metadata.id_embed_dim} ({metadata.id_embed_model}), "
            f"but the dataset's embeddings have width {id_dim}; curate with the matching face backend"
        )
    if "saa" in init.parts and metadata.lora_rank != config.lora_rank:
        raise ValueError(
            f"--init-from weights have lora_rank={metadata.lora_rank}, the run --lora-rank {config.lora_rank}"
        )


def cast_frozen(base: BaseModel, trained: list[nn.Parameter], device: torch.device, dtype: torch.dtype) -> None:
    """Frozen parts to the device in the mixed-precision dtype; trained weights stay float32."""
    for module in (base.unet, base.vae, base.text_encoder, base.image_encoder):
        module.to(device) if dtype == torch.float32 else module.to(device, dtype=dtype)
    for p in trained:
        p.data = p.data.float()


def anchor_metadata(base: BaseModel, config: AnchorConfig, id_model: str, id_dim: int, source: str):
    return CheckpointMetadata(
        base_family=TINY_RANDOM if base.name == TINY_RANDOM else "sd15",
        cross_attention_dim=base.cross_attention_dim,
        lora_rank=config.lora_rank,
        num_tokens=config.num_tokens,
        id_embed_model=id_model,
        id_embed_dim=id_dim,
        clip_embed_dim=base.clip_dim,
        source=source,
    )


def anchor_inputs(
    base: BaseModel,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    dtype: torch.dtype,
    drops: tuple[float, float, float] = (0.0, 0.0, 0.0),
    empty_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Noisy latents, noise, timesteps and the (partly dropped) conditions of one batch."""
    latents = vae_latents(base, batch["pixel_values"], generator)
    noisy, noise, timesteps = noised(base, latents, generator)
    input_ids, id_embeds = batch["input_ids"], batch["id_embeds"]
    clip_pixels = clip_normalised(base, batch["clip_pixel_values"])
    drop_text_p, drop_id_p, drop_both_p = drops
    if sum(drops) > 0:
        draw = torch.rand(latents.shape[0], generator=generator)
        only_text = draw < drop_text_p
        only_id = (draw >= drop_text_p) & (draw < drop_text_p + drop_id_p)
        both = (draw >= drop_text_p + drop_id_p) & (draw < drop_text_p + drop_id_p + drop_both_p)
        drop_text, drop_id = (only_text | both).to(input_ids.device), (only_id | both).to(input_ids.device)
        input_ids = torch.where(drop_text[:, None], empty_ids.to(input_ids.device), input_ids)
        id_embeds = id_embeds * (~drop_id)[:, None].to(id_embeds.dtype)
        clip_pixels = clip_pixels * (~drop_id)[:, None, None, None].to(clip_pixels.dtype)
    return {
        "noisy_latents": noisy,
        "noise": noise,
        "timesteps": timesteps,
        "text": text_states(base, input_ids).to(dtype),
        "id_embeds": id_embeds,
        "clip_embeds": clip_states(base, clip_pixels),
    }


def diffusion_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    pred = model(
        inputs["noisy_latents"], inputs["timesteps"], inputs["text"], inputs["id_embeds"], inputs["clip_embeds"]
    )
    return F.mse_loss(pred.float(), inputs["noise"].float())


class FixedEvaluation:
    """The diffusion loss on fixed rows, noise and timesteps (no drops): comparable across steps and runs."""

    def __init__(self, base: BaseModel, samples: AnchorSamples, count: int, seed: int, device, dtype):
        rows = [samples[i] for i in range(min(count, len(samples)))]
        batch = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
        self.inputs = anchor_inputs(base, batch, torch.Generator().manual_seed(seed + 7919), dtype)

    @torch.no_grad()
    def loss(self, model: nn.Module) -> float:
        return float(diffusion_loss(model, self.inputs))


def train_anchor(config: AnchorConfig, base: BaseModel | None = None) -> Path:
    """Run (or resume) the anchoring stage; returns RUN/weights.safetensors.

    `base`: an already loaded base model to train on (its UNet gets SAA); default: load `config.base_model`.
    """
    from accelerate.utils import set_seed

    # 1. Inputs, checked before any model loads.
    check_output_dir(config)
    dataset = load_curated(config.dataset, ANCHOR_COLUMNS)
    id_model, id_dim = embedding_info(dataset, config.dataset)
    init = read_init(config.init_from, config.num_tokens) if config.init_from else None
    if init is not None:
        check_init_metadata(init, config, id_dim)

    # 2. Accelerator and models (frozen base; SAA and face encoder trained).
    accelerator = make_accelerator(config)
    accelerator.print(accelerator.state)
    set_seed(config.seed)
    dtype = weight_dtype(accelerator)
    base = base or load_base_model(config.base_model, config.image_encoder, seed=config.seed)
    start_run(accelerator, config)  # the run folder only once the inputs and the base model are fine
    unet = base.unet
    if init is not None and "saa" in init.parts:
        init.loader.load_saa_into(unet)
        rank = next(iter(unet.attn_processors.values())).rank
        if rank != config.lora_rank:
            raise ValueError(f"--init-from SAA weights have LoRA rank {rank}, the run --lora-rank {config.lora_rank}")
    else:
        install_saa(unet, rank=config.lora_rank, num_tokens=config.num_tokens)
    face_encoder = build_face_encoder(base, config, id_dim, init)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = AnchorModel(unet, face_encoder)
    parameters = trainable_parameters(model)
    cast_frozen(base, parameters, accelerator.device, dtype)
    metadata = anchor_metadata(base, config, id_model, id_dim, init.source if init else "random")

    # 3. Optimizer, data, prepare.
    optimizer, scheduler = make_optimizer(config, parameters, accelerator.num_processes)
    samples = AnchorSamples(dataset, base.tokenizer, config.resolution)
    loader = make_loader(samples, config, accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    def save_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()  # the project's weights file replaces accelerate's full-UNet model file
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(models[0])
            save_dynamicid(
                Path(output_dir) / WEIGHTS, metadata=metadata, face_encoder=unwrapped.face_encoder, unet=unwrapped.unet
            )

    def load_weights(models: list, input_dir: str) -> None:
        unwrapped = accelerator.unwrap_model(models.pop())
        saved = load_dynamicid(Path(input_dir) / WEIGHTS)
        unwrapped.face_encoder.load_state_dict(saved.state_dicts["face_encoder"])
        load_saa_state_dict(unwrapped.unet, saved.state_dicts["saa"])

    accelerator.register_save_state_pre_hook(save_weights)
    accelerator.register_load_state_pre_hook(load_weights)
    state = RunState(accelerator, config.seed)
    accelerator.register_for_checkpointing(state)
    resume = resume_dir(config)
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {state.step}")

    # 4. Loop.
    metrics = Metrics(accelerator, config, "anchor")
    evaluation = FixedEvaluation(base, samples, config.eval_samples, config.seed, accelerator.device, dtype)
    unwrapped = accelerator.unwrap_model(model)
    bench = ManifestEvaluation(config, base, accelerator) if config.eval_manifest else None

    def evaluate(step: int) -> dict[str, float]:
        return {"eval_loss": evaluation.loss(unwrapped)} | (bench(step, unwrapped.face_encoder) if bench else {})

    if state.step == 0:
        metrics.log(evaluate(0), 0)
    empty_ids = token_ids(base, [""])
    drops = (config.drop_text, config.drop_id, config.drop_both)
    progress = Progress(accelerator, config, "anchor", state.step)
    for batch in epochs(accelerator, loader, state):
        if state.step >= config.max_steps:
            break
        with accelerator.accumulate(model):
            inputs = anchor_inputs(base, batch, state.generator, dtype, drops, empty_ids)
            loss = diffusion_loss(model, inputs)
            accelerator.backward(loss)
            clip_and_step(accelerator, config, parameters, optimizer, scheduler)
        metrics.record(state.step + 1, batch["index"])
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        values = {"loss": mean_over_processes(accelerator, loss), "lr": scheduler.get_last_lr()[0]}
        metrics.log(values, state.step)
        progress.update(values)
        if config.eval_steps and state.step % config.eval_steps == 0:
            metrics.log(evaluate(state.step), state.step)
        if config.validation_steps and state.step % config.validation_steps == 0 and accelerator.is_main_process:
            log_validation(accelerator, base, unwrapped, samples, config, id_dim, state.step, dtype)
        if state.step % config.checkpointing_steps == 0:
            progress.note(f"step {state.step}: checkpoint {save_checkpoint(accelerator, config, state.step)}")

    # 5. Final evaluation and weights.
    if not config.eval_steps or state.step % config.eval_steps:
        metrics.log(evaluate(state.step), state.step)
    progress.close()
    accelerator.wait_for_everyone()
    out = Path(config.output_dir) / WEIGHTS
    if accelerator.is_main_process:
        save_dynamicid(out, metadata=metadata, face_encoder=unwrapped.face_encoder, unet=unwrapped.unet)
    accelerator.end_training()
    return out


@torch.no_grad()
def log_validation(accelerator, base, model: AnchorModel, samples: AnchorSamples, config, id_dim, step, dtype):
    """Sample images of the first references with their own captions."""
    with accelerator.autocast():  # trained parts are float32, frozen ones in the mixed-precision type
        images = _validation_images(accelerator, base, model, samples, config, id_dim, dtype)
    save_samples(accelerator, images, config.output_dir, step)


def _validation_images(accelerator, base, model: AnchorModel, samples: AnchorSamples, config, id_dim, dtype):
    rows = [samples[i] for i in range(min(config.num_validation_images, len(samples)))]
    device = accelerator.device
    text = text_states(base, torch.stack([r["input_ids"] for r in rows])).to(dtype)
    uncond_text = text_states(base, token_ids(base, [""])).to(dtype)
    clip = clip_states(base, clip_normalised(base, torch.stack([r["clip_pixel_values"] for r in rows])))
    id_tokens = model.face_encoder(torch.stack([r["id_embeds"] for r in rows]).to(device), clip)
    uncond_id, uncond_clip = unconditional_face_inputs(base, id_dim)
    uncond_tokens = model.face_encoder(uncond_id, uncond_clip)
    return sample_images(
        base,
        model.unet,
        text,
        uncond_text,
        id_tokens,
        uncond_tokens,
        size=config.resolution,
        steps=config.validation_inference_steps,
        guidance_scale=config.validation_guidance_scale,
        seed=config.seed,
        saa=TRAINING_SAA,
    )
