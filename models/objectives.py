"""Training objectives: how latents are noised and what the denoiser learns to predict from them.

- `epsilon`: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (a_t = the scheduler's alphas_cumprod[t], t uniform in
  0..T-1); target: the noise. SD 1.5 and SDXL, and any base whose scheduler says so.
- `v_prediction`: the same x_t; target v = sqrt(a_t) noise - sqrt(1 - a_t) x0. SD 2.x-style bases and the
  v-prediction fine-tunes of SD 1.5 / SDXL (their scheduler's `prediction_type`).
- `flow_matching` (Flux): x = (1 - sigma) x0 + sigma noise; target noise - x0. sigma is drawn as diffusers' Flux and
  SD3 training examples draw it (`compute_density_for_timestep_sampling`: logit-normal, i.e. sigmoid of a normal
  draw, or uniform), then shifted by the scheduler's `shift` (sigma' = shift sigma / (1 + (shift - 1) sigma), the
  rule of FlowMatchEulerDiscreteScheduler; 1 when it shifts by resolution instead); timesteps = sigma * 1000
  (T = num_train_timesteps); the loss weight is 1 for both densities.

A base family picks its objective (`BaseFamily.objective(scheduler)`); the training stages only call `noised` and
regress `target`, and the weights record the objective's name (`CheckpointMetadata.prediction_type`). Random
draws come from an explicit CPU generator, so a run's draws depend only on its seed and position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction")
PREDICTION_TYPES = (*DDPM_PREDICTION_TYPES, "flow_matching")
SIGMA_DENSITIES = ("logit_normal", "uniform")


@dataclass
class Noised:
    """One batch's noised latents, the noise, the regression target and the denoiser's timesteps."""

    noisy: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor


def _noise_like(latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)


class DDPMObjective:
    """`epsilon` or `v_prediction` over a DDPM-style scheduler (its `add_noise` and `alphas_cumprod`).

    The prediction type is the scheduler's `prediction_type`; any other (e.g. `sample`) is refused.
    """

    def __init__(self, scheduler: Any):
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in DDPM_PREDICTION_TYPES:
            raise ValueError(
                f"the base model's scheduler has prediction_type {prediction_type!r}; training supports "
                f"{', '.join(DDPM_PREDICTION_TYPES)} (scheduler/scheduler_config.json)"
            )
        self.scheduler = scheduler
        self.name = prediction_type

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        noise = _noise_like(latents, generator)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.name == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        return Noised(noisy, noise, target, timesteps)


class FlowMatchingObjective:
    """Rectified flow as Flux is trained: x = (1 - sigma) x0 + sigma noise, target noise - x0.

    Args:
        shift: sigma' = shift sigma / (1 + (shift - 1) sigma) after the draw (1: none).
        density: "logit_normal" (sigmoid of N(logit_mean, logit_std)) or "uniform".
        num_train_timesteps: timesteps = sigma' * num_train_timesteps (Flux's transformer takes them / 1000).
    """

    name = "flow_matching"

    def __init__(
        self,
        *,
        shift: float = 1.0,
        density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        num_train_timesteps: int = 1000,
    ):
        if density not in SIGMA_DENSITIES:
            raise ValueError(f"unknown sigma density {density!r}; known: {', '.join(SIGMA_DENSITIES)}")
        self.shift, self.density = shift, density
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.num_train_timesteps = num_train_timesteps

    @classmethod
    def from_scheduler(cls, scheduler: Any, **density: Any) -> FlowMatchingObjective:
        """The objective of a FlowMatchEulerDiscreteScheduler: its `shift`, unless it shifts by resolution."""
        config = scheduler.config
        shift = 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))
        return cls(shift=shift, num_train_timesteps=int(config.get("num_train_timesteps", 1000)), **density)

    def shifted(self, sigmas: torch.Tensor) -> torch.Tensor:
        """shift sigma / (1 + (shift - 1) sigma): more of the draws at high noise for shift > 1."""
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` noise levels in (0, 1), drawn from the density, then shifted."""
        if self.density == "logit_normal":
            u = torch.sigmoid(torch.normal(self.logit_mean, self.logit_std, size=(count,), generator=generator))
        else:
            u = torch.rand(count, generator=generator)
        return self.shifted(u)

    def noised(self, latents: torch.Tensor, generator: torch.Generator) -> Noised:
        sigmas = self.sigmas(latents.shape[0], generator).to(latents.device)
        noise = _noise_like(latents, generator)
        sigma = sigmas.view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        noisy = (1 - sigma) * latents + sigma * noise
        return Noised(noisy, noise, noise - latents, sigmas * self.num_train_timesteps)
