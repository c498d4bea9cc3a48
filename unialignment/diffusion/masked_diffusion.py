"""Masked diffusion for the text stream.

Follows Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM), with the
SUBS parameterisation, as used for the text stream of D-DiT and UniAlignment (docs/METHOD.md section 4).

Everything here is a small function of tensors; no network lives in this module. The denoiser
(the MMDiT's text head) is passed in by the caller, or, for the memory-light loss, the head's input and
parameters. The reverse process (captions and answers) is in `masked_diffusion_sampler.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def subs_mask_bias(vocab_size: int, mask_token_id: int, device: torch.device) -> torch.Tensor:
    """(V,) float32 added to the logits by SUBS: NEG_INF at the mask token, 0 elsewhere."""
    mask_bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    mask_bias[mask_token_id] = NEG_INF
    return mask_bias


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
    mask_bias = subs_mask_bias(vocab_size, mask_token_id, logits.device)
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
    scored, num_tokens = scored_tokens(clean_ids, score_mask, attention_mask, normalization)
    clean_log_probs = log_probs.gather(-1, clean_ids[..., None]).squeeze(-1)
    weight = nelbo_weight(sigma, dsigma).reshape(-1, 1)
    token_nll = -clean_log_probs * weight
    token_nll = token_nll * scored
    return MaskedDiffusionLoss(loss=token_nll.sum() / num_tokens, token_nll=token_nll, num_tokens=num_tokens)


def scored_tokens(
    clean_ids: torch.Tensor,
    score_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    normalization: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool of the scored tokens and the loss's normaliser, shared by both forms of the loss (and by
    whoever computes the masked positions ahead, see `masked_positions`)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    scored = torch.ones_like(clean_ids, dtype=torch.bool)
    if score_mask is not None:
        scored = scored & score_mask.bool()
    if normalization == "real_tokens" and attention_mask is not None:
        scored = scored & attention_mask.bool()

    if normalization == "batch_length":
        num_tokens = torch.tensor(float(clean_ids.numel()), device=clean_ids.device)
    else:
        # clamp: a batch without a scored token gives loss 0 rather than NaN.
        num_tokens = scored.sum().float().clamp_min(1.0)
    return scored, num_tokens


def masked_diffusion_loss_from_hidden_states(
    hidden_states: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    noisy_ids: torch.Tensor,
    clean_ids: torch.Tensor,
    sigma: torch.Tensor,
    dsigma: torch.Tensor,
    mask_token_id: int,
    score_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    normalization: str = "batch_length",
    chunk_size: int = 1024,
    masked_index: torch.Tensor | None = None,
) -> MaskedDiffusionLoss:
    """`masked_diffusion_loss` of SUBS on a linear text head, without materialising the (B, L, V) logits.

        Under SUBS an unmasked position's log p(x_0 | x_t) does not depend on the network: 0 when it holds its clean
        token (always, for x_t from `mask_tokens`) and NEG_INF otherwise, so it contributes a constant and no gradient,
        and it is added as such (no precondition on the ids). Only masked, scored positions need the head. They are
        gathered (one host sync: their count sets the shapes) and their float32 logits are computed `chunk_size`
        positions at a time (`masked_index`, when the caller computed them ahead with `masked_positions`, saves the
    sync), each chunk under activation checkpointing: backward keeps the chunk's inputs, not its
        (chunk_size, V) logits, and recomputes them. log p(x_0) = logit(x_0) - logsumexp(logits), the log-softmax
        entry without the full log-softmax tensor.

        Equals `masked_diffusion_loss(subs_log_probs(F.linear(hidden_states.float(), head_weight.float(),
        head_bias.float()), noisy_ids, mask_token_id), clean_ids, ...)` up to float rounding, gradients included.
        From bfloat16 states and weights the float32 head is more precise than a bfloat16 head whose logits are then
        cast, so the loss differs from that path by the bfloat16 rounding of the logits.

        Args:
            hidden_states: (B, L, D) input of the text head (the final normed text states), any float dtype.
            head_weight: (V, D) weight of the text head; head_bias: (V,) or None.
            noisy_ids: (B, L) noisy ids x_t; clean_ids: (B, L) clean ids x_0.
            sigma, dsigma, score_mask, attention_mask, normalization: as in `masked_diffusion_loss`.
            mask_token_id: id of the mask token.
            chunk_size: masked positions per chunk; the head's transient memory is a few chunk_size x V float32.
            masked_index: `masked_positions(noisy_ids, scored)` computed by the caller (on the host, before the ids
                went to the device), or None to compute it here.

        Returns:
            `MaskedDiffusionLoss` whose token_nll is the full (B, L) tensor of `masked_diffusion_loss`.
    """
    assert chunk_size >= 1, f"chunk_size must be at least 1, got {chunk_size}."
    scored, num_tokens = scored_tokens(clean_ids, score_mask, attention_mask, normalization)
    batch_size, length, hidden_size = hidden_states.shape
    weight = nelbo_weight(sigma, dsigma).reshape(-1, 1)

    is_masked = noisy_ids == mask_token_id
    copy_log_probs = torch.where(~is_masked & (noisy_ids != clean_ids), NEG_INF, 0.0)
    token_nll = -copy_log_probs * weight
    token_nll = token_nll * scored

    if masked_index is None:
        masked_index = masked_positions(noisy_ids, scored, mask_token_id)  # a host sync on an accelerator
    masked_states = hidden_states.reshape(-1, hidden_size).index_select(0, masked_index)
    masked_clean_ids = clean_ids.flatten().index_select(0, masked_index)
    masked_log_probs = _chunked_log_probs(
        masked_states, masked_clean_ids, head_weight, head_bias, mask_token_id, chunk_size
    )
    masked_weight = weight.flatten().index_select(0, masked_index // length)
    masked_nll = -masked_log_probs * masked_weight
    token_nll = token_nll.flatten().index_put((masked_index,), masked_nll).reshape(batch_size, length)
    return MaskedDiffusionLoss(loss=token_nll.sum() / num_tokens, token_nll=token_nll, num_tokens=num_tokens)


def masked_positions(noisy_ids: torch.Tensor, scored: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """(N,) long: the flat positions (row * L + column) of the masked tokens among the `scored` (B, L) ones, the
    only positions where the SUBS loss depends on the network."""
    return ((noisy_ids == mask_token_id) & scored).flatten().nonzero().squeeze(1)


def _chunked_log_probs(
    states: torch.Tensor,
    clean_ids: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    mask_token_id: int,
    chunk_size: int,
) -> torch.Tensor:
    """(N,) SUBS log p(x_0) of N masked positions ((N, D) head inputs, (N,) clean ids), `chunk_size` at a time,
    each chunk checkpointed so that backward recomputes its logits instead of keeping them."""
    # Cast once, not per chunk: the chunks' weight gradients then accumulate in float32.
    head_weight = head_weight.float()
    head_bias = head_bias.float() if head_bias is not None else None
    mask_bias = subs_mask_bias(head_weight.shape[0], mask_token_id, head_weight.device)
    # At least one chunk, empty when nothing is masked: the head stays in the graph and gets zero gradients
    # rather than none (data parallel training expects every parameter to get one).
    chunks = [
        checkpoint(
            _clean_token_log_probs,
            states[start : start + chunk_size],
            clean_ids[start : start + chunk_size],
            head_weight,
            head_bias,
            mask_bias,
            use_reentrant=False,
        )
        for start in range(0, max(len(states), 1), chunk_size)
    ]
    return torch.cat(chunks)


def _clean_token_log_probs(
    hidden_states: torch.Tensor,
    clean_ids: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    mask_bias: torch.Tensor,
) -> torch.Tensor:
    """SUBS log p(x_0) at masked positions: (N, D) head inputs and (N,) clean ids -> (N,) float32."""
    logits = F.linear(hidden_states.float(), head_weight, head_bias) + mask_bias
    return logits.gather(-1, clean_ids[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)
