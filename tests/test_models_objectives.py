"""Training objectives against their formulas, written out here (SD 1.5's schedule from tests/oracles.py, the
flow-matching rules from diffusers' own scheduler and training helper), and the prediction_type contract."""

import numpy as np
import oracles
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from scipy import stats

from dynamicid.models.base import load_base_model
from dynamicid.models.conditioning import Conditioner
from dynamicid.models.families import FAMILIES
from dynamicid.models.objectives import FlowMatchingObjective
from dynamicid.schemas import CheckpointMetadata
from dynamicid.train.anchor import AnchorObjective

SD15_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def _latents(seed=0, shape=(6, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_objectives_noise_and_target_follow_the_formulas(prediction_type):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; target noise (epsilon) or sqrt(a_t) noise - sqrt(1 - a_t) x0 (v)."""
    scheduler = DDPMScheduler(**SD15_SCHEDULE, prediction_type=prediction_type)
    objective = FAMILIES["sd15"].objective(scheduler)
    assert objective.name == prediction_type
    x0 = _latents()
    noised = objective.noised(x0, torch.Generator().manual_seed(1))
    alpha = oracles.sd15_alphas_cumprod()[noised.timesteps].view(-1, 1, 1, 1)
    x0, noise = x0.double(), noised.noise.double()
    expected_noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    expected_target = noise if prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    torch.testing.assert_close(noised.noisy.double(), expected_noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(noised.target.double(), expected_target, rtol=1e-5, atol=1e-5)
    assert (
        noised.timesteps.dtype == torch.int64 and 0 <= int(noised.timesteps.min()) <= int(noised.timesteps.max()) < 1000
    )


def test_an_unknown_prediction_type_is_refused_in_one_line():
    base = load_base_model("tiny-random")
    base.noise_scheduler = DDPMScheduler(**SD15_SCHEDULE, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'; training supports epsilon, v_prediction") as error:
        AnchorObjective(base, torch.float32)
    assert "\n" not in str(error.value)


def test_weights_without_prediction_type_read_as_epsilon():
    """Files written before the field existed were all trained with epsilon."""
    header = CheckpointMetadata(prediction_type="v_prediction").to_header()
    assert CheckpointMetadata.from_header(header).prediction_type == "v_prediction"
    del header["prediction_type"]
    assert CheckpointMetadata.from_header(header).prediction_type == "epsilon"


def test_flow_matching_noisy_latents_target_and_timesteps():
    """x = (1 - sigma) x0 + sigma noise, target noise - x0, timesteps = sigma * 1000: on literals."""
    x0 = torch.full((3, 16, 2, 2), 2.0)
    objective = FlowMatchingObjective(shift=3.0)
    noised = objective.noised(x0, torch.Generator().manual_seed(0))
    sigma = noised.timesteps / 1000
    assert sigma.shape == (3,) and bool(((sigma > 0) & (sigma < 1)).all())
    for i in range(3):
        s, n = float(sigma[i]), noised.noise[i]
        torch.testing.assert_close(noised.noisy[i], (1 - s) * 2.0 + s * n, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(noised.target[i], n - 2.0, rtol=0, atol=0)
    assert 0.5 < float(noised.noise.std()) < 1.5


def test_flow_matching_sigmas_are_diffusers_density_then_the_schedulers_shift():
    """The draw equals diffusers' compute_density_for_timestep_sampling with the same generator seed; the shift
    equals FlowMatchEulerDiscreteScheduler's (its training timesteps over the uniform grid)."""
    for density in ("logit_normal", "uniform"):
        objective = FlowMatchingObjective(shift=3.0, density=density, logit_mean=0.3, logit_std=1.2)
        u = compute_density_for_timestep_sampling(
            density, 64, logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(7)
        )
        ours = objective.sigmas(64, torch.Generator().manual_seed(7))
        torch.testing.assert_close(ours, 3.0 * u / (1 + 2.0 * u), rtol=1e-6, atol=1e-7)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    grid = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(FlowMatchingObjective(shift=3.0).shifted(grid) * 1000, scheduler.timesteps)


def test_flow_matching_sigma_densities_have_the_right_distribution():
    """KS tests on 4000 draws: logit(sigma) ~ N(mean, std) unshifted; sigma ~ U(0, 1) for the uniform density."""
    generator = torch.Generator().manual_seed(3)
    logit_normal = FlowMatchingObjective(logit_mean=-0.5, logit_std=0.8).sigmas(4000, generator).double().numpy()
    assert stats.kstest(np.log(logit_normal / (1 - logit_normal)), "norm", args=(-0.5, 0.8)).pvalue > 1e-3
    uniform = FlowMatchingObjective(density="uniform").sigmas(4000, generator).numpy()
    assert stats.kstest(uniform, "uniform").pvalue > 1e-3
    with pytest.raises(ValueError, match="unknown sigma density 'mode'"):
        FlowMatchingObjective(density="mode")


def test_flow_matching_takes_the_schedulers_shift_unless_it_shifts_by_resolution():
    assert FlowMatchingObjective.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0)).shift == 3.0
    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # FLUX.1-dev's config
    assert FlowMatchingObjective.from_scheduler(dynamic).shift == 1.0


def test_flux_anchoring_inputs_are_flow_matching_over_shifted_and_scaled_latents():
    """tiny-random-flux: x0 = (VAE posterior sample - shift_factor) * scaling_factor, written out here; the
    objective's noisy latents and target satisfy noisy = x0 + sigma * target (x = (1 - sigma) x0 + sigma noise,
    target noise - x0) with sigma = timesteps / 1000, and the noise they imply is standard normal."""
    base = load_base_model("tiny-random-flux")
    assert base.vae.config.shift_factor and base.vae.config.latent_channels == 16
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    batch = {"pixel_values": pixels, "input_ids": Conditioner.from_parts(base).token_ids(["a photo", "a face"])}
    batch |= {"clip_pixel_values": torch.zeros(2, 3, 224, 224, dtype=torch.uint8), "id_embeds": torch.randn(2, 128)}
    inputs = AnchorObjective(base, torch.float32).inputs(batch, torch.Generator().manual_seed(9), training=False)

    with torch.no_grad():
        posterior = base.vae.encode(pixels.float() / 127.5 - 1).latent_dist
    draw = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(9))
    config = base.vae.config
    x0 = (posterior.mean + posterior.std * draw - config.shift_factor) * config.scaling_factor
    sigma = (inputs["timesteps"] / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs["noisy_latents"] - sigma * inputs["target"], x0, rtol=1e-4, atol=1e-4)
    noise = inputs["target"] + x0
    assert 0.5 < float(noise.std()) < 1.5 and abs(float(noise.mean())) < 0.3
