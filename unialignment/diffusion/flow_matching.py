"""The image stream's rectified flow (docs/METHOD.md section 3).

Rectified flow as trained in Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis"): x_t = (1 - sigma) x_0 + sigma * eps, the network
predicts the velocity v = eps - x_0, and the loss compares the implied clean latent x_t - sigma * v with
x_0. Timestep densities and loss weights are diffusers' SD3 training utilities; the discretisation is
diffusers' `FlowMatchEulerDiscreteScheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

# "logit_normal" is the reference (logit-normal density, weight 1). The others are SD3's alternatives:
# "mode" (mode density, weight 1), "sigma_sqrt" and "cosmap" (uniform density, weighted loss).
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap")


def _check_scheme(weighting_scheme: str) -> None:
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {weighting_scheme!r}.")


def sample_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler,
    batch_size: int,
    weighting_scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one training timestep per sample: u from the scheme's density, i = floor(N u),
    timestep = scheduler.timesteps[i], sigma = scheduler.sigmas[i].

    Returns (timesteps, sigmas), each (B,), on `device`. The scheduler must be the training one
    (no `set_timesteps` call), whose N = num_train_timesteps entries run from 1000 down to 1.
    """
    _check_scheme(weighting_scheme)
    num_train_timesteps = scheduler.config.num_train_timesteps
    if len(scheduler.timesteps) != num_train_timesteps:
        raise ValueError("sample_timesteps needs the training scheduler: do not call set_timesteps on it.")
    u = compute_density_for_timestep_sampling(
        weighting_scheme,
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
    )
    # u can round to exactly 1.0 in float32 for large draws; keep the index in range.
    indices = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
    timesteps = scheduler.timesteps[indices].to(device)
    sigmas = scheduler.sigmas[indices].to(device)
    return timesteps, sigmas


def add_noise(clean_latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x_0 + sigma * eps; sigmas (B,) broadcast over (B, C, H, W)."""
    sigmas = sigmas.to(clean_latents.dtype).view(-1, *([1] * (clean_latents.ndim - 1)))
    return (1.0 - sigmas) * clean_latents + sigmas * noise


def flow_matching_loss(
    velocity: torch.Tensor,
    noisy_latents: torch.Tensor,
    clean_latents: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "logit_normal",
) -> torch.Tensor:
    """Mean over elements and batch of w(sigma) (x_t - sigma v - x_0)^2, computed in float32."""
    _check_scheme(weighting_scheme)
    sigmas = sigmas.float().view(-1, *([1] * (velocity.ndim - 1)))
    predicted_clean = noisy_latents.float() - sigmas * velocity.float()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
    per_sample = (weighting * (predicted_clean - clean_latents.float()) ** 2).flatten(1).mean(dim=1)
    return per_sample.mean()


def drop_condition(
    prompt_embeds: torch.Tensor,
    null_prompt_embeds: torch.Tensor,
    drop_probability: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's prompt states by the null prompt's with probability `drop_probability`,
    which teaches the unconditional prediction that classifier-free guidance needs.

    prompt_embeds (B, L, D), null_prompt_embeds (1, L, D) or (B, L, D). Returns the new states and
    the (B,) bool mask of dropped samples.
    """
    dropped = draw_condition_dropout(prompt_embeds.shape[0], drop_probability, generator)
    return apply_condition_dropout(prompt_embeds, null_prompt_embeds, dropped), dropped.to(prompt_embeds.device)


def draw_condition_dropout(
    batch_size: int, drop_probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) bool on the CPU: which samples lose their condition (`drop_condition`'s draw, made on its own so that it
    can come before the prompts are encoded)."""
    return torch.rand(batch_size, generator=generator) < drop_probability


def apply_condition_dropout(
    prompt_embeds: torch.Tensor, null_prompt_embeds: torch.Tensor, dropped: torch.Tensor
) -> torch.Tensor:
    """The prompt states with the `dropped` (B,) samples' replaced by the null prompt's."""
    null = null_prompt_embeds.to(prompt_embeds.dtype).expand_as(prompt_embeds)
    return torch.where(dropped.to(prompt_embeds.device).view(-1, 1, 1), null, prompt_embeds)


def guided_velocity(velocity: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance over a batch holding [unconditional; conditional] halves:
    v = v_uncond + g (v_cond - v_uncond)."""
    velocity_uncond, velocity_cond = velocity.chunk(2)
    return velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)


def sample_rectified_flow(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int = 28,
    guidance_scale: float = 7.0,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor:
    """Euler integration from noise (sigma = 1) to data over the scheduler's sigmas.

    denoiser(latent_input, timesteps) -> velocity. With guidance_scale > 1 the latents are doubled and
    the denoiser must treat the first half as unconditional and the second as conditional (the caller
    arranges its prompt states, and any condition images, in that order); both halves run in one batch.
    The scheduler's own config (its shift) decides the sigmas; `set_timesteps` is called here.
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    # The loop starts at the first timestep: said up front, the scheduler does not look its index up on the device
    # (a host synchronisation) at the first step.
    scheduler.set_begin_index(0)
    use_guidance = guidance_scale > 1.0
    timesteps = scheduler.timesteps
    for timestep in progress(timesteps) if progress is not None else timesteps:
        latent_input = torch.cat([latents, latents]) if use_guidance else latents
        velocity = denoiser(latent_input, timestep.expand(latent_input.shape[0]))
        if use_guidance:
            velocity = guided_velocity(velocity, guidance_scale)
        latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    return latents
