"""Reconfiguration: train IMR + the keypoint encoder; UNet, SAA and face encoder frozen (METHOD.md "Training").

A sample is one identity: a source row and K target rows. IMR rewrites the source's cached face tokens towards
each target's landmark vector (keypoint encoder over the landmark map) and face-prompt vector (pooled CLIP text).
Loss = dfm_weight * MSE(pred tokens, target tokens)  ("DFM")
     + ldc_weight * MSE(UNet(noisy target latents, t, text + pred tokens), UNet(same, text + target tokens))  ("LDC"),
with the fixed UNet prompt schemas.RECONFIGURE_UNET_PROMPT. Both parts are logged separately.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynamicid.models import IMR, KeypointEncoder, load_dynamicid, save_dynamicid
from dynamicid.models.base import BaseModel, load_base_model
from dynamicid.schemas import RECONFIGURE_UNET_PROMPT
from dynamicid.train.anchor import TRAINING_SAA, cast_frozen
from dynamicid.train.cache_tokens import file_digest, read_tokens
from dynamicid.train.conditioning import (
    noised,
    pooled_text,
    text_states,
    token_ids,
    unconditional_face_inputs,
    vae_latents,
)
from dynamicid.train.config import ReconfigureConfig
from dynamicid.train.data import RECONFIGURE_COLUMNS, IdentitySamples, collate_identities, load_curated
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


class Reconfigurator(nn.Module):
    """Keypoint encoder + IMR: one forward rewrites the tokens of every identity of a batch."""

    def __init__(self, imr: IMR, keypoint_encoder: KeypointEncoder):
        super().__init__()
        self.imr = imr
        self.keypoint_encoder = keypoint_encoder

    def forward(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each item: tokens (1+K, n, C) source first, landmark_maps (1+K, 1, 96, 96), text (1+K, txt)."""
        maps = torch.cat([item["landmark_maps"] for item in items])
        landmarks = self.keypoint_encoder(maps).flatten(1).split([len(item["landmark_maps"]) for item in items])
        predictions = []
        for item, vectors in zip(items, landmarks, strict=True):
            tokens, text = item["tokens"], item["text"]
            predictions.append(self.imr(tokens[:1], vectors[:1], vectors[1:], text[:1], text[1:]))
        return predictions


class TextVectors:
    """Pooled CLIP text vectors of face prompts, memoised (35 distinct prompts at most)."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        new = sorted(set(prompts) - set(self.cache))
        if new:
            self.cache.update(zip(new, pooled_text(self.base, new).float(), strict=True))
        return torch.stack([self.cache[p] for p in prompts])


def model_inputs(items: list[dict[str, Any]], text_vectors: TextVectors, device: torch.device) -> list[dict]:
    return [
        {
            "tokens": item["tokens"].to(device),
            "landmark_maps": item["landmark_maps"].to(device),
            "text": text_vectors(item["face_prompts"]).to(device),
        }
        for item in items
    ]


def reconfigure_loss(
    model: nn.Module,
    base: BaseModel,
    items: list[dict[str, Any]],
    text_vectors: TextVectors,
    unet_text: torch.Tensor,
    generator: torch.Generator,
    config: ReconfigureConfig,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, DFM, LDC) of a batch of identities."""
    device = unet_text.device
    predicted = torch.cat(model(model_inputs(items, text_vectors, device)))
    targets = torch.cat([item["tokens"][1:] for item in items]).to(device)
    dfm = F.mse_loss(predicted.float(), targets.float())

    pixels = torch.cat([item["pixel_values"] for item in items])
    noisy, _, timesteps = noised(base, vae_latents(base, pixels, generator), generator)
    text = unet_text.expand(len(targets), -1, -1)
    saa = {"saa": TRAINING_SAA}
    with torch.no_grad():
        targets_states = torch.cat([text, targets.to(dtype)], 1)
        reference = base.unet(noisy, timesteps, encoder_hidden_states=targets_states, cross_attention_kwargs=saa).sample
    states = torch.cat([text, predicted.to(dtype)], 1)
    prediction = base.unet(noisy, timesteps, encoder_hidden_states=states, cross_attention_kwargs=saa).sample
    ldc = F.mse_loss(prediction.float(), reference.float())
    return config.dfm_weight * dfm + config.ldc_weight * ldc, dfm, ldc


class FixedEvaluation:
    """DFM + LDC on fixed identities, draws, noise and timesteps."""

    def __init__(self, samples: IdentitySamples, count: int, seed: int):
        fixed = IdentitySamples(samples.dataset, samples.tokens, samples.resolution, samples.targets, seed + 7919)
        self.items = [fixed[i] for i in range(min(count, len(fixed)))]
        self.seed = seed + 7919

    @torch.no_grad()
    def losses(self, model: Reconfigurator, base, text_vectors, unet_text, config, dtype) -> dict[str, float]:
        model.eval()  # BatchNorm on its running statistics
        generator = torch.Generator().manual_seed(self.seed)
        total, dfm, ldc = reconfigure_loss(model, base, self.items, text_vectors, unet_text, generator, config, dtype)
        model.train()
        return {"eval_loss": float(total), "eval_dfm": float(dfm), "eval_ldc": float(ldc)}


def train_reconfigure(config: ReconfigureConfig, base: BaseModel | None = None) -> Path:
    """Run (or resume) the reconfiguration stage; returns RUN/weights.safetensors (IMR + keypoint encoder).

    `base`: an already loaded base model (without SAA); default: load `config.base_model`.
    """
    from accelerate.utils import set_seed

    # 1. Inputs, checked before any model loads.
    check_output_dir(config)
    dataset = load_curated(config.dataset, RECONFIGURE_COLUMNS)
    anchor = load_dynamicid(config.anchor)
    for part in ("saa", "face_encoder"):
        if part not in anchor.metadata.parts:
            raise ValueError(f"--anchor {config.anchor} holds no {part}: give the anchoring run's weights.safetensors")
    tokens = read_tokens(config.tokens, dataset, config.anchor)

    # 2. Accelerator and models.
    accelerator = make_accelerator(config)
    accelerator.print(accelerator.state)
    set_seed(config.seed)
    dtype = weight_dtype(accelerator)
    base = base or load_base_model(config.base_model, config.image_encoder, seed=config.seed)
    start_run(accelerator, config)  # the run folder only once the inputs and the base model are fine
    anchor.load_saa_into(base.unet)
    base.unet.requires_grad_(False)
    if config.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    md = anchor.metadata
    imr = IMR(
        dim=config.imr_dim,
        dim_head=config.imr_dim_head,
        heads=config.imr_heads,
        num_queries=md.num_tokens,
        embedding_dim=md.cross_attention_dim,
        txt_dim=base.text_dim,
        depth=config.imr_depth,
    )
    model = Reconfigurator(imr, KeypointEncoder(md.cross_attention_dim, width=config.keypoint_width))
    parameters = trainable_parameters(model)
    cast_frozen(base, parameters, accelerator.device, dtype)
    model.to(accelerator.device)
    metadata = dataclasses.replace(
        md,
        imr_depth=config.imr_depth,
        imr_dim=config.imr_dim,
        keypoint_dim=md.cross_attention_dim,
        source=f"anchor:{Path(config.anchor).name}:{file_digest(config.anchor)}",
    )

    # 3. Optimizer, data, prepare.
    optimizer, scheduler = make_optimizer(config, parameters, accelerator.num_processes)
    samples = IdentitySamples(dataset, tokens, config.resolution, config.targets_per_identity, config.seed)
    loader = make_loader(samples, config, accelerator.num_processes, collate_fn=collate_identities)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    def save_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(models[0])
            save_dynamicid(
                Path(output_dir) / WEIGHTS,
                metadata=metadata,
                imr=unwrapped.imr,
                keypoint_encoder=unwrapped.keypoint_encoder,
            )

    def load_weights(models: list, input_dir: str) -> None:
        unwrapped = accelerator.unwrap_model(models.pop())
        saved = load_dynamicid(Path(input_dir) / WEIGHTS)
        unwrapped.imr.load_state_dict(saved.state_dicts["imr"])
        unwrapped.keypoint_encoder.load_state_dict(saved.state_dicts["keypoint_encoder"])

    accelerator.register_save_state_pre_hook(save_weights)
    accelerator.register_load_state_pre_hook(load_weights)
    state = RunState(accelerator, config.seed)
    accelerator.register_for_checkpointing(state)
    resume = resume_dir(config)
    if resume is not None:
        accelerator.load_state(str(resume))
        accelerator.print(f"resumed from {resume} at step {state.step}")

    # 4. Loop.
    metrics = Metrics(accelerator, config, "reconfigure")
    text_vectors = TextVectors(base)
    unet_text = text_states(base, token_ids(base, [RECONFIGURE_UNET_PROMPT])).to(dtype)
    unwrapped = accelerator.unwrap_model(model)
    evaluation = FixedEvaluation(samples, config.eval_samples, config.seed)
    eval_args = (base, text_vectors, unet_text, config, dtype)
    bench = ManifestEvaluation(config, base, accelerator) if config.eval_manifest else None
    bench_encoder = anchor.build_face_encoder().to(accelerator.device) if bench else None

    def evaluate(step: int) -> dict[str, float]:
        figures = bench(step, bench_encoder, unwrapped.imr, unwrapped.keypoint_encoder) if bench else {}
        return evaluation.losses(unwrapped, *eval_args) | figures

    if state.step == 0:
        metrics.log(evaluate(0), 0)
    progress = Progress(accelerator, config, "reconfigure", state.step)
    for items in epochs(accelerator, loader, state):
        if state.step >= config.max_steps:
            break
        with accelerator.accumulate(model):
            loss, dfm, ldc = reconfigure_loss(
                model, base, items, text_vectors, unet_text, state.generator, config, dtype
            )
            accelerator.backward(loss)
            clip_and_step(accelerator, config, parameters, optimizer, scheduler)
        metrics.record(state.step + 1, torch.cat([item["rows"] for item in items]))
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        values = {name: mean_over_processes(accelerator, v) for name, v in (("loss", loss), ("dfm", dfm), ("ldc", ldc))}
        values["lr"] = scheduler.get_last_lr()[0]
        metrics.log(values, state.step)
        progress.update(values)
        if config.eval_steps and state.step % config.eval_steps == 0:
            metrics.log(evaluate(state.step), state.step)
        if config.validation_steps and state.step % config.validation_steps == 0 and accelerator.is_main_process:
            log_validation(
                accelerator, base, unwrapped, anchor, evaluation, text_vectors, unet_text, config, state.step
            )
        if state.step % config.checkpointing_steps == 0:
            progress.note(f"step {state.step}: checkpoint {save_checkpoint(accelerator, config, state.step)}")

    # 5. Final evaluation and weights.
    if not config.eval_steps or state.step % config.eval_steps:
        metrics.log(evaluate(state.step), state.step)
    progress.close()
    accelerator.wait_for_everyone()
    out = Path(config.output_dir) / WEIGHTS
    if accelerator.is_main_process:
        save_dynamicid(out, metadata=metadata, imr=unwrapped.imr, keypoint_encoder=unwrapped.keypoint_encoder)
    accelerator.end_training()
    return out


@torch.no_grad()
def log_validation(accelerator, base, model, anchor, evaluation, text_vectors, unet_text, config, step) -> None:
    """Images of the first evaluation identity rewritten towards its targets' expressions and poses."""
    with accelerator.autocast():  # trained parts are float32, frozen ones in the mixed-precision type
        images = _validation_images(base, model, anchor, evaluation, text_vectors, unet_text, config)
    save_samples(accelerator, images, config.output_dir, step)


def _validation_images(base, model, anchor, evaluation, text_vectors, unet_text, config):
    item = evaluation.items[0]
    device = unet_text.device
    model.eval()
    tokens = model(model_inputs([item], text_vectors, device))[0][: config.num_validation_images]
    model.train()
    face_encoder = anchor.build_face_encoder().to(device)
    uncond_tokens = face_encoder(*unconditional_face_inputs(base, anchor.metadata.id_embed_dim))
    uncond_text = text_states(base, token_ids(base, [""])).to(unet_text.dtype)
    return sample_images(
        base,
        base.unet,
        unet_text.expand(len(tokens), -1, -1),
        uncond_text,
        tokens,
        uncond_tokens,
        size=config.resolution,
        steps=config.validation_inference_steps,
        guidance_scale=config.validation_guidance_scale,
        seed=config.seed,
        saa=TRAINING_SAA,
    )
