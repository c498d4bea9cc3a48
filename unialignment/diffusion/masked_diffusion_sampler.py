"""Sampling texts with the text stream: MDLM's ancestral reverse process with the SUBS parameterisation.

Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM), as docs/METHOD.md section 4
describes it: from all mask tokens (a question's tokens kept), each step unmasks some positions, a visible token
never changes, and a step that changed nothing lets the next one reuse the denoiser's output (the cache).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from unialignment.diffusion.masked_diffusion import subs_log_probs, subs_mask_bias

SamplerNoise = Literal["gumbel", "unmask_first"]
SAMPLER_NOISES = get_args(SamplerNoise)


@dataclass
class MaskedDiffusionSample:
    """token_ids: (B, L) sampled ids, no mask token left; num_denoiser_calls: calls actually made."""

    token_ids: torch.Tensor
    num_denoiser_calls: int


def initial_ids_from_prompt(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None, mask_token_id: int
) -> torch.Tensor:
    """Start of sampling: all mask tokens, except the prompt tokens (prompt_mask True) which are kept.

    Args:
        prompt_ids: (B, L) ids; only the positions where prompt_mask is True are read.
        prompt_mask: (B, L) bool, or None for an unprompted (all-mask) start.

    Returns:
        (B, L) long ids.
    """
    all_mask = torch.full_like(prompt_ids, mask_token_id)
    if prompt_mask is None:
        return all_mask
    return torch.where(prompt_mask.bool(), prompt_ids, all_mask)


def _gumbel_noise(
    shape: torch.Size, generator: torch.Generator | list[torch.Generator] | None, device: torch.device
) -> torch.Tensor:
    if isinstance(generator, list):  # one per row: each row draws what a one-row run with its generator draws
        return torch.cat([_gumbel_noise((1, *shape[1:]), row_generator, device) for row_generator in generator])
    # Drawn where the generator lives (a CPU generator is common, also for GPU sampling), then moved.
    draw_device = generator.device if generator is not None else device
    uniform = torch.rand(shape, generator=generator, device=draw_device).to(device)
    # clamp: keeps the noise finite (u = 0 would give -inf).
    uniform = uniform.clamp_min(torch.finfo(uniform.dtype).tiny)
    return -torch.log(-torch.log(uniform))


def _reverse_step(
    noisy_ids: torch.Tensor,
    log_p_x0: torch.Tensor,
    t: float,
    s: float,
    mask_token_id: int,
    gumbel: torch.Tensor,
) -> torch.Tensor:
    """One step x_t -> x_s of the MDLM reverse process.

    q(x_s | x_t) is proportional to p_x0 * (t - s) with the mask token's entry set to s; the
    categorical draw is argmax(log q + Gumbel), done in log space so no probability underflows.
    Tokens that are already unmasked never change.
    """
    log_q = log_p_x0 + math.log(t - s)
    log_q[..., mask_token_id] = math.log(s)
    sampled_ids = (log_q + gumbel).argmax(dim=-1)
    return torch.where(noisy_ids == mask_token_id, sampled_ids, noisy_ids)


def _unmask_first_uniforms(
    num_steps: int,
    batch_size: int,
    length: int,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    """Every uniform of an "unmask_first" run, drawn at once: (num_steps, 2, B, L) float64 on `device`.

    [step, 0] decides which masked positions unmask, [step, 1] picks their tokens. They are drawn where the
    generator lives and moved in one transfer for the whole run: with a CPU generator and a GPU denoiser (common),
    per-step draws would cost a transfer per step. A list holds one generator per row; row b then gets the
    (num_steps, 2, 1, L) that a one-row run with its generator draws. float64 because the token uniform resolves
    intervals of the float64 cumulative p_x0 (`_cumulative_p_x0`); memory is num_steps * 2 * B * L * 8 bytes.
    """
    if isinstance(generator, list):
        uniforms = torch.cat(
            [
                torch.rand(
                    (num_steps, 2, 1, length), generator=row_generator, device=row_generator.device, dtype=torch.float64
                )
                for row_generator in generator
            ],
            dim=2,
        )
    else:
        draw_device = generator.device if generator is not None else device
        uniforms = torch.rand(
            (num_steps, 2, batch_size, length), generator=generator, device=draw_device, dtype=torch.float64
        )
    return uniforms.to(device)


def _cumulative_p_x0(log_p_x0: torch.Tensor) -> torch.Tensor:
    """(B, L, V) running sum of p_x0 over the vocabulary, float64, for inverse-CDF draws.

    float64 because a float32 running sum rounds each token's share by up to half an ulp of the sum so far
    (3e-8 near 1): over a 32k vocabulary that moves about 2e-4 of probability mass (total variation), and tail
    tokens can become impossible to draw.
    """
    return torch.cumsum(log_p_x0.exp(), dim=-1, dtype=torch.float64)


def _unmask_first_step(
    noisy_ids: torch.Tensor,
    cumulative_p_x0: torch.Tensor,
    t: float,
    s: float,
    mask_token_id: int,
    unmask_uniform: torch.Tensor,
    token_uniform: torch.Tensor,
) -> torch.Tensor:
    """One step x_t -> x_s of the MDLM reverse process, drawn as "does it unmask, then which token".

    Same distribution as `_reverse_step`: SUBS gives p_x0 zero mass on the mask token and mass 1 on the others,
    so q(x_s | x_t), proportional to p_x0 (t - s) with s on the mask, keeps a masked position masked with
    probability s / t and otherwise draws its token from p_x0. Two uniforms per position instead of V Gumbels,
    and no host synchronisation. Tokens that are already unmasked never change.

    Args:
        noisy_ids: (B, L) x_t.
        cumulative_p_x0: (B, L, V) `_cumulative_p_x0` of the SUBS log p_x0 at x_t.
        unmask_uniform, token_uniform: (B, L) uniforms in [0, 1).

    Returns:
        (B, L) long x_s.
    """
    sampled_ids = _inverse_cdf(cumulative_p_x0, token_uniform)
    unmask = (noisy_ids == mask_token_id) & (unmask_uniform < (t - s) / t)
    return torch.where(unmask, sampled_ids, noisy_ids)


def _inverse_cdf(cumulative_p_x0: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(...) token ids drawn from (..., V) running sums of p_x0 by (...) uniforms in [0, 1)."""
    # Scaled by the row's own total rather than 1, which absorbs the rounding of the running sum. u < 1 keeps the
    # target below the total, and right=True returns the first entry above it: a token with positive mass, never
    # a zero-mass one such as the mask token, even at u = 0.
    total = cumulative_p_x0[..., -1:]
    target = uniform[..., None].to(cumulative_p_x0.dtype) * total
    sampled_ids = torch.searchsorted(cumulative_p_x0, target, right=True).squeeze(-1)
    return sampled_ids.clamp_max(cumulative_p_x0.shape[-1] - 1)  # a guard only, see above


def _unmask_first_gathered(
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    initial_ids: torch.Tensor,
    mask_token_id: int,
    times: list[float],
    steps: Iterable[int],
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The "unmask_first" steps with the cache, drawing each token only where a position unmasks: per step, the
    positions that unmask are found first (one host synchronisation, which is also the cache's check: none found,
    nothing changes), and only their rows of the logits go through the SUBS softmax and the float64 running sum.
    The same ids as `_unmask_first_step` at every position (the same uniforms, the same arithmetic per row) at
    (K, V) instead of (B, L, V) cost. Returns (ids, the logits of those ids or None, denoiser calls)."""
    noisy_ids, logits, num_calls = initial_ids.clone(), None, 0
    mask_bias = None
    for step in steps:
        if logits is None:
            logits = denoiser(noisy_ids)
            num_calls += 1
            mask_bias = subs_mask_bias(logits.shape[-1], mask_token_id, logits.device)
        t, s = times[step], times[step + 1]
        unmask_uniform, token_uniform = uniforms[step]
        unmask = (noisy_ids == mask_token_id) & (unmask_uniform < (t - s) / t)
        positions = unmask.nonzero(as_tuple=True)
        if positions[0].numel() == 0:  # nothing unmasks: the ids, and so the denoiser's output, stay
            continue
        log_p_x0 = torch.log_softmax(logits[positions].float() + mask_bias, dim=-1)
        noisy_ids = noisy_ids.index_put(positions, _inverse_cdf(_cumulative_p_x0(log_p_x0), token_uniform[positions]))
        logits = None
    return noisy_ids, logits, num_calls


@torch.no_grad()
def sample_masked_diffusion(
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    initial_ids: torch.Tensor,
    mask_token_id: int,
    num_steps: int,
    final_time: float = 1e-5,
    use_cache: bool = True,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    noise: SamplerNoise = "gumbel",
) -> MaskedDiffusionSample:
    """Ancestral MDLM sampling over times linspace(1, final_time, num_steps + 1).

    The text stream always runs at timestep 0, so p_x0 depends only on x_t: when a step changes no
    token, the next step reuses p_x0 instead of calling the denoiser (the cache). The noise does not
    depend on the cache (Gumbel noise is drawn every step, the "unmask_first" uniforms all before the loop), so
    cached and uncached runs with one seed give the same ids.

    Args:
        denoiser: maps (B, L) noisy ids to (B, L, V) logits.
        initial_ids: (B, L) start, all mask tokens except prompt tokens (`initial_ids_from_prompt`).
        generator: one for the batch, or one per row; a row with its own generator samples what it would alone
            (the denoiser sees each row on its own, up to floating-point differences of batched arithmetic).
        progress: optional wrapper over the step iterable, e.g. `tqdm`.
        noise: how a step draws x_s, same distribution either way. "gumbel": argmax of log q plus B x L x V
            Gumbel noise drawn each step where the generator lives; the default, as it reproduces earlier outputs.
            "unmask_first": per position, one uniform for whether it unmasks and one for its token by inverse CDF
            (`_unmask_first_step`); all 2 x num_steps x B x L uniforms are drawn before the loop where the generator
            lives and moved to initial_ids' device at once. With the cache, a step first finds the positions that
            unmask (its one host synchronisation, which is also the cache's check) and draws tokens for those rows
            only (`_unmask_first_gathered`); without it, a step draws at every position and needs no
            synchronisation. The same ids either way; different ids from "gumbel" for one seed.
    """
    assert num_steps >= 1, f"num_steps must be at least 1, got {num_steps}."
    assert 0 < final_time < 1, f"final_time must lie in (0, 1), got {final_time}."
    if isinstance(generator, list) and len(generator) != initial_ids.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {initial_ids.shape[0]} rows; pass one or one per row.")
    if noise not in SAMPLER_NOISES:
        raise ValueError(f"noise must be one of {SAMPLER_NOISES}, got {noise!r}")
    times = torch.linspace(1.0, final_time, num_steps + 1, dtype=torch.float64).tolist()
    steps = range(num_steps) if progress is None else progress(range(num_steps))

    uniforms = None
    if noise == "unmask_first":
        uniforms = _unmask_first_uniforms(num_steps, *initial_ids.shape, generator, initial_ids.device)
    if uniforms is not None and use_cache:
        noisy_ids, logits, num_denoiser_calls = _unmask_first_gathered(
            denoiser, initial_ids, mask_token_id, times, steps, uniforms
        )
        log_p_x0 = None if logits is None else subs_log_probs(logits, noisy_ids, mask_token_id)
        return _finish(denoiser, noisy_ids, log_p_x0, mask_token_id, num_denoiser_calls)

    noisy_ids = initial_ids.clone()
    log_p_x0 = None  # p_x0 of the current noisy_ids, kept while they do not change
    num_denoiser_calls = 0
    for step in steps:
        if log_p_x0 is None:
            log_p_x0 = subs_log_probs(denoiser(noisy_ids), noisy_ids, mask_token_id)
            num_denoiser_calls += 1
            cumulative_p_x0 = None if uniforms is None else _cumulative_p_x0(log_p_x0)
        t, s = times[step], times[step + 1]
        if uniforms is None:
            gumbel = _gumbel_noise(log_p_x0.shape, generator, log_p_x0.device)
            next_ids = _reverse_step(noisy_ids, log_p_x0, t, s, mask_token_id, gumbel)
        else:
            next_ids = _unmask_first_step(noisy_ids, cumulative_p_x0, t, s, mask_token_id, *uniforms[step])
        if not use_cache or not torch.equal(next_ids, noisy_ids):
            log_p_x0 = None
        noisy_ids = next_ids
    return _finish(denoiser, noisy_ids, log_p_x0, mask_token_id, num_denoiser_calls)


def _finish(
    denoiser: Callable[[torch.Tensor], torch.Tensor],
    noisy_ids: torch.Tensor,
    log_p_x0: torch.Tensor | None,
    mask_token_id: int,
    num_denoiser_calls: int,
) -> MaskedDiffusionSample:
    """A token still masked at final_time takes its most likely clean value."""
    still_masked = noisy_ids == mask_token_id
    if still_masked.any():
        if log_p_x0 is None:
            log_p_x0 = subs_log_probs(denoiser(noisy_ids), noisy_ids, mask_token_id)
            num_denoiser_calls += 1
        noisy_ids = torch.where(still_masked, log_p_x0.argmax(dim=-1), noisy_ids)
    return MaskedDiffusionSample(token_ids=noisy_ids, num_denoiser_calls=num_denoiser_calls)
