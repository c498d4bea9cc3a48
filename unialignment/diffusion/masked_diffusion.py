"""Masked diffusion for the text stream.

Follows Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM), with the
SUBS parameterisation, as used for the text stream of D-DiT and UniAlignment (SPEC section 4).

Everything here is a small function of tensors; no network lives in this module. The denoiser
(the MMDiT's text head) is passed in by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Stands in for log(0): finite, so that 0 * NEG_INF stays 0 and gradients stay finite.
NEG_INF = -1e6

NORMALIZATIONS = ("batch_length", "real_tokens")


@dataclass(frozen=True)
class LogLinearSchedule:
    """Log-linear noise schedule: the mask probability grows linearly, p(t) = (1 - eps) t.

    `eps` keeps sigma(1) = -log(eps) finite, so that a sliver of tokens survive at t = 1.
    """

    eps: float = 1e-3

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma(t) = -log(1 - (1 - eps) t)."""
        return -torch.log1p(-(1 - self.eps) * t)

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        """Rate d sigma / dt = (1 - eps) / (1 - (1 - eps) t)."""
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - exp(-sigma(t))."""
        return -torch.expm1(-self.sigma(t))


def sample_antithetic_times(
    batch_size: int,
    sampling_eps: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Stratified ("antithetic") times, one per stratum of [sampling_eps, 1]: lowers loss variance.

    t_j = (1 - e_s) * ((r_j / n + j / n) mod 1) + e_s with r_j ~ U(0, 1).

    Returns:
        (batch_size,) float32 times in [sampling_eps, 1].
    """
    uniform = torch.rand(batch_size, generator=generator, device=device)
    offsets = torch.arange(batch_size, device=device) / batch_size
    stratified = (uniform / batch_size + offsets) % 1
    return (1 - sampling_eps) * stratified + sampling_eps


def mask_tokens(
    input_ids: torch.Tensor,
    mask_probability: torch.Tensor | float,
    mask_token_id: int,
    noisable_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Forward process q(x_t | x_0): each token independently becomes the mask token.

    Args:
        input_ids: (B, L) clean token ids x_0.
        mask_probability: (B,) per-sample p(t), or a scalar for the whole batch.
        mask_token_id: id of the mask token.
        noisable_mask: (B, L) bool, True where a token may be noised (the prompted variant noises
            only the answer, the prompt stays clean); None noises every token.

    Returns:
        (B, L) long noisy ids x_t.
    """
    probability = torch.as_tensor(mask_probability, dtype=torch.float32, device=input_ids.device)
    if probability.ndim == 1:
        probability = probability[:, None]
    draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = draws < probability
    if noisable_mask is not None:
        to_mask = to_mask & noisable_mask.bool()
    return torch.where(to_mask, mask_token_id, input_ids)


def subs_log_probs(logits: torch.Tensor, noisy_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """SUBS parameterisation of log p_theta(x_0 | x_t).

    Zero masking probability: the mask token is never predicted as a clean token. Carry-over
    unmasking: an unmasked token of x_t is already clean, so it is copied with probability 1.

    Args:
        logits: (B, L, V) denoiser logits, any float dtype (computed in float32).
        noisy_ids: (B, L) noisy ids x_t.

    Returns:
        (B, L, V) float32 log probabilities.
    """
    vocab_size = logits.shape[-1]
    mask_bias = torch.zeros(vocab_size, dtype=torch.float32, device=logits.device)
    mask_bias[mask_token_id] = NEG_INF
    log_probs = torch.log_softmax(logits.float() + mask_bias, dim=-1)

    is_observed = F.one_hot(noisy_ids, num_classes=vocab_size).bool()
    copy_log_probs = torch.where(is_observed, 0.0, NEG_INF)
    is_unmasked = (noisy_ids != mask_token_id)[..., None]
    return torch.where(is_unmasked, copy_log_probs, log_probs)


def nelbo_weight(sigma: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
    """Weight of -log p(x_0 | x_t) in the continuous-time NELBO: dsigma / (exp(sigma) - 1).

    For the log-linear schedule this is exactly 1 / t.
    """
    return dsigma / torch.expm1(sigma)


@dataclass
class MaskedDiffusionLoss:
    """loss: scalar; token_nll: (B, L) weighted per-token loss; num_tokens: the normaliser used."""

    loss: torch.Tensor
    token_nll: torch.Tensor
    num_tokens: torch.Tensor


def masked_diffusion_loss(
    log_probs: torch.Tensor,
    clean_ids: torch.Tensor,
    sigma: torch.Tensor,
    dsigma: torch.Tensor,
    score_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    normalization: str = "batch_length",
) -> MaskedDiffusionLoss:
    """MDLM NELBO: sum of -log p(x_0 | x_t) * dsigma / expm1(sigma), normalised.

    Unmasked positions contribute exactly 0 (SUBS gives log p = 0 at the observed, clean token), so
    the sum runs in effect over masked positions.

    Args:
        log_probs: (B, L, V) SUBS log probabilities (`subs_log_probs`).
        clean_ids: (B, L) clean ids x_0.
        sigma, dsigma: (B,) schedule values at each sample's time.
        score_mask: (B, L) bool, the tokens that are scored (prompted variant: the answer tokens,
            the prompt is never scored); None scores every token.
        attention_mask: (B, L) real (non-padding) tokens; used by "real_tokens" only.
        normalization: "batch_length" divides by B * L (reference: padding is EOS and is counted);
            "real_tokens" divides by the number of scored real tokens and zeroes the others.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    clean_log_probs = log_probs.gather(-1, clean_ids[..., None]).squeeze(-1)
    weight = nelbo_weight(sigma, dsigma).reshape(-1, 1)
    token_nll = -clean_log_probs * weight

    scored = torch.ones_like(clean_ids, dtype=torch.bool)
    if score_mask is not None:
        scored = scored & score_mask.bool()
    if normalization == "real_tokens" and attention_mask is not None:
        scored = scored & attention_mask.bool()
    token_nll = token_nll * scored

    if normalization == "batch_length":
        num_tokens = torch.tensor(float(clean_ids.numel()), device=token_nll.device)
    else:
        # clamp: a batch without a scored token gives loss 0 rather than NaN.
        num_tokens = scored.sum().float().clamp_min(1.0)
    return MaskedDiffusionLoss(loss=token_nll.sum() / num_tokens, token_nll=token_nll, num_tokens=num_tokens)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


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
) -> MaskedDiffusionSample:
    """Ancestral MDLM sampling over times linspace(1, final_time, num_steps + 1).

    The text stream always runs at timestep 0, so p_x0 depends only on x_t: when a step changes no
    token, the next step reuses p_x0 instead of calling the denoiser (the cache). The Gumbel noise
    is drawn every step either way, so cached and uncached runs with one seed give the same ids.

    Args:
        denoiser: maps (B, L) noisy ids to (B, L, V) logits.
        initial_ids: (B, L) start, all mask tokens except prompt tokens (`initial_ids_from_prompt`).
        generator: one for the batch, or one per row; a row with its own generator samples what it would alone
            (the denoiser sees each row on its own, up to floating-point differences of batched arithmetic).
        progress: optional wrapper over the step iterable, e.g. `tqdm`.
    """
    assert num_steps >= 1, f"num_steps must be at least 1, got {num_steps}."
    assert 0 < final_time < 1, f"final_time must lie in (0, 1), got {final_time}."
    if isinstance(generator, list) and len(generator) != initial_ids.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {initial_ids.shape[0]} rows; pass one or one per row.")
    times = torch.linspace(1.0, final_time, num_steps + 1, dtype=torch.float64).tolist()
    steps = range(num_steps) if progress is None else progress(range(num_steps))

    noisy_ids = initial_ids.clone()
    log_p_x0 = None  # p_x0 of the current noisy_ids, kept while they do not change
    num_denoiser_calls = 0
    for step in steps:
        if log_p_x0 is None:
            log_p_x0 = subs_log_probs(denoiser(noisy_ids), noisy_ids, mask_token_id)
            num_denoiser_calls += 1
        gumbel = _gumbel_noise(log_p_x0.shape, generator, log_p_x0.device)
        next_ids = _reverse_step(noisy_ids, log_p_x0, times[step], times[step + 1], mask_token_id, gumbel)
        if not use_cache or not torch.equal(next_ids, noisy_ids):
            log_p_x0 = None
        noisy_ids = next_ids

    # A token still masked at final_time takes its most likely clean value.
    still_masked = noisy_ids == mask_token_id
    if still_masked.any():
        if log_p_x0 is None:
            log_p_x0 = subs_log_probs(denoiser(noisy_ids), noisy_ids, mask_token_id)
            num_denoiser_calls += 1
        noisy_ids = torch.where(still_masked, log_p_x0.argmax(dim=-1), noisy_ids)
    return MaskedDiffusionSample(token_ids=noisy_ids, num_denoiser_calls=num_denoiser_calls)
