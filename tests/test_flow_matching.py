"""Rectified flow: timestep sampling, noising, the x0-target loss, condition dropout, guided Euler sampling."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unialignment.diffusion.flow_matching import (
    add_noise,
    drop_condition,
    flow_matching_loss,
    guided_velocity,
    sample_rectified_flow,
    sample_timesteps,
)


def test_timesteps_follow_the_scheduler_and_the_logit_normal_density():
    scheduler = FlowMatchEulerDiscreteScheduler()
    generator = torch.Generator().manual_seed(0)
    timesteps, sigmas = sample_timesteps(scheduler, 20000, generator=generator)
    torch.testing.assert_close(sigmas, timesteps / 1000)
    assert timesteps.min() >= 1 and timesteps.max() <= 1000
    # sigma = sigmoid(n) with n ~ N(0, 1): median 0.5, P(sigma < sigmoid(1)) = Phi(1) = 0.8413.
    assert abs(sigmas.median().item() - 0.5) < 0.01
    assert abs((sigmas < torch.sigmoid(torch.tensor(1.0))).float().mean().item() - 0.8413) < 0.01


@pytest.mark.parametrize("scheme", ["mode", "sigma_sqrt", "cosmap"])
def test_other_sd3_schemes_are_selectable(scheme):
    timesteps, sigmas = sample_timesteps(FlowMatchEulerDiscreteScheduler(), 64, scheme)
    assert sigmas.shape == (64,) and bool(((sigmas > 0) & (sigmas <= 1)).all())


def test_unknown_scheme_and_inference_scheduler_are_errors():
    scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="weighting_scheme"):
        sample_timesteps(scheduler, 4, "uniformish")
    scheduler.set_timesteps(28)
    with pytest.raises(ValueError, match="training scheduler"):
        sample_timesteps(scheduler, 4)


def test_noising_and_loss_on_known_tensors():
    clean, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    sigmas = torch.tensor([0.5, 0.25])
    noisy = add_noise(clean, noise, sigmas)
    torch.testing.assert_close(noisy[0], torch.full((1, 2, 2), 0.5))
    torch.testing.assert_close(noisy[1], torch.full((1, 2, 2), 0.75))
    # The exact velocity eps - x0 = -1 implies x0_hat = x0: zero loss.
    assert flow_matching_loss(-torch.ones_like(clean), noisy, clean, sigmas).item() == pytest.approx(0.0)
    # v = 0 implies x0_hat = x_t: errors 0.5 and 0.25 -> mean of 0.25 and 0.0625.
    assert flow_matching_loss(torch.zeros_like(clean), noisy, clean, sigmas).item() == pytest.approx(0.15625)
    # cosmap weights 2 / (pi (1 - 2s + 2s^2)): 4/pi at s = 0.5, 2/(0.625 pi) at s = 0.25.
    expected = (4 / math.pi * 0.25 + 2 / (0.625 * math.pi) * 0.0625) / 2
    assert flow_matching_loss(torch.zeros_like(clean), noisy, clean, sigmas, "cosmap").item() == pytest.approx(expected)


def test_condition_dropout_replaces_with_the_null_prompt():
    prompt, null = torch.randn(4000, 3, 2), torch.zeros(1, 3, 2)
    unchanged, dropped = drop_condition(prompt, null, 0.0)
    assert torch.equal(unchanged, prompt) and not dropped.any()
    everything, dropped = drop_condition(prompt, null, 1.0)
    assert dropped.all() and not everything.any()
    mixed, dropped = drop_condition(prompt, null, 0.1, torch.Generator().manual_seed(0))
    assert abs(dropped.float().mean().item() - 0.1) < 0.02
    assert torch.equal(mixed[~dropped], prompt[~dropped]) and not mixed[dropped].any()


def test_guidance_combines_the_two_halves():
    velocity = torch.tensor([[1.0], [3.0]])  # [uncond; cond]
    torch.testing.assert_close(guided_velocity(velocity, 7.0), torch.tensor([[1.0 + 7.0 * 2.0]]))


def _point_mass_denoiser(unconditional_target, conditional_target, guided):
    """The exact velocity toward a point mass a: v(x_t, sigma) = (x_t - a) / sigma."""

    def denoiser(latents, timesteps):
        sigma = (timesteps / 1000).view(-1, 1)
        if not guided:
            return (latents - conditional_target) / sigma
        uncond, cond = latents.chunk(2)
        return torch.cat([(uncond - unconditional_target) / sigma[:1], (cond - conditional_target) / sigma[:1]])

    return denoiser


def test_euler_sampling_reaches_the_target_and_guidance_extrapolates():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    start = torch.randn(3, 4)
    a, b = torch.full((3, 4), 2.0), torch.full((3, 4), -1.0)
    plain = sample_rectified_flow(_point_mass_denoiser(b, a, False), start, scheduler, 10, guidance_scale=1.0)
    torch.testing.assert_close(plain, a)
    # Straight paths: the guided field points at b + g (a - b).
    steps = []
    guided = sample_rectified_flow(
        _point_mass_denoiser(b, a, True),
        start,
        scheduler,
        10,
        guidance_scale=3.0,
        progress=lambda it: (steps.append(t) or t for t in it),
    )
    torch.testing.assert_close(guided, b + 3.0 * (a - b))
    assert len(steps) == 10
