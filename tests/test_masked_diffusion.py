"""Masked diffusion (MDLM, SUBS): numbers checked against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from unialignment.diffusion.masked_diffusion import (
    NEG_INF,
    NORMALIZATIONS,
    LogLinearSchedule,
    mask_tokens,
    masked_diffusion_loss,
    masked_diffusion_loss_from_hidden_states,
    nelbo_weight,
    sample_antithetic_times,
    subs_log_probs,
)
from unialignment.diffusion.masked_diffusion_sampler import (
    SAMPLER_NOISES,
    _cumulative_p_x0,
    _gumbel_noise,
    _reverse_step,
    _unmask_first_step,
    initial_ids_from_prompt,
    sample_masked_diffusion,
)

EPS = 1e-3
MASK_ID = 3  # vocabulary of 4 in the hand-made examples: clean tokens 0, 1, 2 and the mask


# ----------------------------------------------------------------------------- schedule


def test_log_linear_schedule_at_half_and_one():
    schedule = LogLinearSchedule(eps=EPS)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    expected_sigma = [0.0, -math.log(1 - (1 - EPS) * 0.5), -math.log(EPS)]
    expected_dsigma = [1 - EPS, (1 - EPS) / (1 - (1 - EPS) * 0.5), (1 - EPS) / EPS]
    expected_mask_probability = [0.0, (1 - EPS) * 0.5, 1 - EPS]

    assert schedule.sigma(t).tolist() == pytest.approx(expected_sigma, rel=1e-12, abs=1e-12)
    assert schedule.dsigma(t).tolist() == pytest.approx(expected_dsigma, rel=1e-12)
    assert schedule.mask_probability(t).tolist() == pytest.approx(expected_mask_probability, rel=1e-12, abs=1e-12)


def test_nelbo_weight_is_one_over_t_for_log_linear():
    schedule = LogLinearSchedule(eps=EPS)
    t = torch.linspace(1e-3, 1.0, 200)
    weight = nelbo_weight(schedule.sigma(t), schedule.dsigma(t))
    torch.testing.assert_close(weight, 1 / t, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- time sampling


def test_antithetic_times_one_per_stratum():
    batch_size, sampling_eps = 64, 1e-3
    times = sample_antithetic_times(batch_size, sampling_eps, generator=torch.Generator().manual_seed(0))

    assert times.shape == (batch_size,)
    assert times.min() >= sampling_eps and times.max() <= 1.0
    strata = ((times.sort().values - sampling_eps) / (1 - sampling_eps) * batch_size).floor().long()
    assert strata.tolist() == list(range(batch_size))


# ----------------------------------------------------------------------------- forward process


def test_mask_tokens_fraction_follows_per_sample_probability():
    clean_ids = torch.randint(0, MASK_ID, (4, 20_000), generator=torch.Generator().manual_seed(0))
    probability = torch.tensor([0.0, 0.3, 0.7, 1.0])
    noisy_ids = mask_tokens(clean_ids, probability, MASK_ID, generator=torch.Generator().manual_seed(1))

    assert noisy_ids.dtype == torch.long
    masked_fraction = (noisy_ids == MASK_ID).float().mean(dim=1)
    assert masked_fraction.tolist() == pytest.approx(probability.tolist(), abs=0.015)
    assert torch.equal(noisy_ids[0], clean_ids[0])  # p = 0 changes nothing
    unmasked = noisy_ids != MASK_ID
    assert torch.equal(noisy_ids[unmasked], clean_ids[unmasked])  # unmasked tokens stay clean


def test_mask_tokens_never_touches_prompt():
    clean_ids = torch.randint(0, MASK_ID, (8, 1000), generator=torch.Generator().manual_seed(0))
    noisable_mask = torch.zeros_like(clean_ids, dtype=torch.bool)
    noisable_mask[:, 600:] = True  # prompt first, answer after
    noisy_ids = mask_tokens(clean_ids, 1.0, MASK_ID, noisable_mask=noisable_mask)

    assert torch.equal(noisy_ids[:, :600], clean_ids[:, :600])
    assert (noisy_ids[:, 600:] == MASK_ID).all()


# ----------------------------------------------------------------------------- SUBS


def test_subs_never_predicts_mask_and_copies_unmasked_tokens():
    logits = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits[..., MASK_ID] = 50.0  # the network prefers the mask token; SUBS must overrule it
    original_logits = logits.clone()
    noisy_ids = torch.tensor([[3, 0, 3, 2, 1], [1, 3, 3, 3, 0]])

    log_probs = subs_log_probs(logits, noisy_ids, MASK_ID)
    probs = log_probs.exp()

    assert log_probs.dtype == torch.float32
    assert torch.equal(logits, original_logits)  # input untouched
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))
    assert probs[..., MASK_ID].max() < 1e-30

    unmasked = noisy_ids != MASK_ID
    observed_log_probs = log_probs.gather(-1, noisy_ids[..., None]).squeeze(-1)
    assert (observed_log_probs[unmasked] == 0).all()
    assert ((log_probs == NEG_INF).sum(-1)[unmasked] == 3).all()  # every other entry is -1e6

    # Masked positions: softmax over the clean tokens only.
    expected = torch.softmax(logits[0, 0, :MASK_ID].float(), dim=-1)
    torch.testing.assert_close(probs[0, 0, :MASK_ID], expected)


# ----------------------------------------------------------------------------- loss

# Every position has p_theta(x_0) = (1/8, 2/8, 5/8) over tokens 0, 1, 2, and a large mask logit.
CLEAN_PROBS = torch.tensor([1 / 8, 2 / 8, 5 / 8])


def _constant_logits(batch_size, length):
    logits = torch.cat([CLEAN_PROBS.log(), torch.tensor([100.0])])
    return logits.expand(batch_size, length, 4)


def _schedule_at(t):
    schedule = LogLinearSchedule(eps=EPS)
    t = torch.tensor(t)
    return schedule.sigma(t), schedule.dsigma(t)


def test_loss_hand_computed_both_normalizations():
    clean_ids = torch.tensor([[0, 1, 2], [2, 2, 0]])
    noisy_ids = torch.tensor([[3, 1, 3], [2, 3, 3]])
    sigma, dsigma = _schedule_at([0.5, 0.25])  # NELBO weights 1/t = 2 and 4
    log_probs = subs_log_probs(_constant_logits(2, 3), noisy_ids, MASK_ID)

    # Masked: row 0 holds tokens 0 and 2, row 1 holds tokens 2 and 0; unmasked tokens add 0.
    row_0 = 2 * (math.log(8) + math.log(8 / 5))
    row_1 = 4 * (math.log(8 / 5) + math.log(8))
    out = masked_diffusion_loss(log_probs, clean_ids, sigma, dsigma)
    assert out.loss.item() == pytest.approx((row_0 + row_1) / 6, rel=1e-4)
    assert out.num_tokens.item() == 6
    assert out.token_nll[0].tolist() == pytest.approx([2 * math.log(8), 0.0, 2 * math.log(8 / 5)], rel=1e-4)

    # Real tokens only: the last token of row 1 is padding.
    attention_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = masked_diffusion_loss(
        log_probs, clean_ids, sigma, dsigma, attention_mask=attention_mask, normalization="real_tokens"
    )
    assert out.loss.item() == pytest.approx((row_0 + 4 * math.log(8 / 5)) / 5, rel=1e-4)
    assert out.num_tokens.item() == 5
    assert out.token_nll[1, 2].item() == 0.0

    # The reference normalisation counts padding, so the attention mask changes nothing there.
    out = masked_diffusion_loss(log_probs, clean_ids, sigma, dsigma, attention_mask=attention_mask)
    assert out.loss.item() == pytest.approx((row_0 + row_1) / 6, rel=1e-4)


def test_prompted_variant_scores_answer_tokens_only():
    clean_ids = torch.tensor([[1, 0, 2, 0]])
    answer_mask = torch.tensor([[False, False, True, True]])
    noisy_ids = mask_tokens(clean_ids, 1.0, MASK_ID, noisable_mask=answer_mask)
    assert noisy_ids.tolist() == [[1, 0, MASK_ID, MASK_ID]]

    sigma, dsigma = _schedule_at([0.5])
    log_probs = subs_log_probs(_constant_logits(1, 4), noisy_ids, MASK_ID)
    answer_nll = 2 * (math.log(8 / 5) + math.log(8))

    out = masked_diffusion_loss(log_probs, clean_ids, sigma, dsigma, score_mask=answer_mask)
    assert out.token_nll[0, :2].tolist() == [0.0, 0.0]
    assert out.loss.item() == pytest.approx(answer_nll / 4, rel=1e-4)

    out = masked_diffusion_loss(
        log_probs, clean_ids, sigma, dsigma, score_mask=answer_mask, normalization="real_tokens"
    )
    assert out.num_tokens.item() == 2
    assert out.loss.item() == pytest.approx(answer_nll / 2, rel=1e-4)

    # A position outside the score mask is never scored, even when masked.
    fully_masked = torch.full_like(clean_ids, MASK_ID)
    log_probs = subs_log_probs(_constant_logits(1, 4), fully_masked, MASK_ID)
    out = masked_diffusion_loss(log_probs, clean_ids, sigma, dsigma, score_mask=answer_mask)
    assert out.loss.item() == pytest.approx(answer_nll / 4, rel=1e-4)


def test_loss_backpropagates_to_logits():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    noisy_ids = torch.tensor([[3, 1, 3], [2, 3, 3]])
    sigma, dsigma = _schedule_at([0.5, 0.25])
    out = masked_diffusion_loss(subs_log_probs(logits, noisy_ids, MASK_ID), torch.zeros_like(noisy_ids), sigma, dsigma)
    out.loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[noisy_ids != MASK_ID] == 0).all()  # copied tokens carry no gradient


def test_loss_rejects_unknown_normalization():
    with pytest.raises(ValueError, match="batch_length.*real_tokens"):
        masked_diffusion_loss(
            torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), *_schedule_at([0.5]), normalization="mean"
        )


# ----------------------------------------------------------------------------- sampling

# Per-position target distributions over tokens 0..3; token 4 is the mask.
SAMPLER_MASK_ID = 4
TARGET_PROBS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])


class FixedDenoiser:
    """Returns the same per-position logits whatever the input; counts its calls."""

    def __init__(self, probs=TARGET_PROBS):
        self.logits = torch.cat([probs.log(), torch.full((len(probs), 1), 10.0)], dim=-1)  # mask logit is large
        self.num_calls = 0

    def __call__(self, noisy_ids):
        self.num_calls += 1
        return self.logits.expand(noisy_ids.shape[0], -1, -1)


def test_sampler_matches_denoiser_distribution_and_keeps_prompt():
    num_rows = 4000
    prompt_ids = torch.tensor([[2, 0, 0]]).expand(num_rows, -1)
    prompt_mask = torch.tensor([[True, False, False]]).expand(num_rows, -1)
    start_ids = initial_ids_from_prompt(prompt_ids, prompt_mask, SAMPLER_MASK_ID)
    assert start_ids[0].tolist() == [2, SAMPLER_MASK_ID, SAMPLER_MASK_ID]

    denoiser = FixedDenoiser()
    sample = sample_masked_diffusion(
        denoiser, start_ids, SAMPLER_MASK_ID, num_steps=16, generator=torch.Generator().manual_seed(0)
    )
    token_ids = sample.token_ids

    assert token_ids.shape == (num_rows, 3)
    assert (token_ids != SAMPLER_MASK_ID).all()
    assert (token_ids[:, 0] == 2).all()
    assert sample.num_denoiser_calls == denoiser.num_calls
    for position in (1, 2):
        frequencies = torch.bincount(token_ids[:, position], minlength=4).float() / num_rows
        assert (frequencies - TARGET_PROBS[position]).abs().max() < 0.03


def test_sampler_unprompted_distribution():
    start_ids = initial_ids_from_prompt(torch.zeros(4000, 3, dtype=torch.long), None, SAMPLER_MASK_ID)
    sample = sample_masked_diffusion(
        FixedDenoiser(), start_ids, SAMPLER_MASK_ID, num_steps=8, generator=torch.Generator().manual_seed(1)
    )
    for position in range(3):
        frequencies = torch.bincount(sample.token_ids[:, position], minlength=4).float() / 4000
        assert (frequencies - TARGET_PROBS[position]).abs().max() < 0.03


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_saves_calls_and_gives_identical_samples(seed):
    start_ids = torch.full((1, 2), SAMPLER_MASK_ID)
    probs = TARGET_PROBS[:2]
    cached, uncached = FixedDenoiser(probs), FixedDenoiser(probs)

    with_cache = sample_masked_diffusion(
        cached, start_ids, SAMPLER_MASK_ID, 64, use_cache=True, generator=torch.Generator().manual_seed(seed)
    )
    without_cache = sample_masked_diffusion(
        uncached, start_ids, SAMPLER_MASK_ID, 64, use_cache=False, generator=torch.Generator().manual_seed(seed)
    )

    assert torch.equal(with_cache.token_ids, without_cache.token_ids)
    # A call only after a step that unmasked something: at most one per token plus the first.
    assert with_cache.num_denoiser_calls == cached.num_calls <= 3
    assert without_cache.num_denoiser_calls == uncached.num_calls >= 64


def test_sampler_fills_remaining_masks_with_argmax():
    # One step from t = 1 to s = 0.999 leaves almost every token masked; the final argmax fills them.
    start_ids = torch.full((200, 3), SAMPLER_MASK_ID)
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1]]).expand(3, -1)
    denoiser = FixedDenoiser(probs)
    sample = sample_masked_diffusion(
        denoiser, start_ids, SAMPLER_MASK_ID, 1, final_time=0.999, generator=torch.Generator().manual_seed(0)
    )
    assert (sample.token_ids != SAMPLER_MASK_ID).all()
    assert (sample.token_ids == 1).float().mean() > 0.99
    assert sample.num_denoiser_calls == denoiser.num_calls <= 2


def test_sampler_progress_wraps_steps():
    seen_steps = []

    def progress(steps):
        for step in steps:
            seen_steps.append(step)
            yield step

    sample_masked_diffusion(FixedDenoiser(), torch.full((1, 3), SAMPLER_MASK_ID), SAMPLER_MASK_ID, 5, progress=progress)
    assert seen_steps == list(range(5))


def test_a_generator_per_row_samples_each_row_as_it_would_alone():
    rows = 6
    start_ids = torch.full((rows, 3), SAMPLER_MASK_ID)
    start_ids[2, 0] = 1  # rows differ, so the per-row noise must follow its row

    def run(ids, generators):
        return sample_masked_diffusion(FixedDenoiser(), ids, SAMPLER_MASK_ID, 8, generator=generators).token_ids

    together = run(start_ids, [torch.Generator().manual_seed(seed) for seed in range(rows)])
    alone = torch.cat([run(start_ids[row : row + 1], torch.Generator().manual_seed(row)) for row in range(rows)])
    assert torch.equal(together, alone)
    assert len({tuple(row) for row in together.tolist()}) > 1  # the seeds give different rows
    with pytest.raises(ValueError, match="2 generators for 6 rows"):
        run(start_ids, [torch.Generator(), torch.Generator()])


# ----------------------------------------------------------------------------- sampling: the unmask-first step

# scipy.stats.chi2.ppf(0.999, 15): 3 positions x (6 outcomes - 1) degrees of freedom, p = 0.001 (scipy is not a
# dependency, hence the number).
CHI_SQUARE_15_DOF_AT_P_0_001 = 37.697


@pytest.mark.parametrize("noise", SAMPLER_NOISES)
@pytest.mark.parametrize(("t", "s"), [(1.0, 0.6), (0.5, 0.2)])
@pytest.mark.parametrize("mask_id", [2, 5])  # inside the vocabulary and its last entry
def test_one_reverse_step_matches_exact_probabilities(noise, t, s, mask_id):
    # From all-mask, a position stays masked with probability s / t, else becomes v with p_x0(v) (t - s) / t.
    num_rows, length, vocab_size = 20_000, 3, 6
    logits = torch.randn(length, vocab_size, generator=torch.Generator().manual_seed(0))
    logits[:, mask_id] = 10.0  # the network prefers the mask token; SUBS must overrule it
    noisy_ids = torch.full((num_rows, length), mask_id)
    log_p_x0 = subs_log_probs(logits.expand(num_rows, -1, -1), noisy_ids, mask_id)

    generator = torch.Generator().manual_seed(1)
    if noise == "gumbel":
        gumbel = _gumbel_noise(log_p_x0.shape, generator, log_p_x0.device)
        next_ids = _reverse_step(noisy_ids, log_p_x0, t, s, mask_id, gumbel)
    else:
        unmask_uniform, token_uniform = torch.rand((2, num_rows, length), generator=generator, dtype=torch.float64)
        next_ids = _unmask_first_step(
            noisy_ids, _cumulative_p_x0(log_p_x0), t, s, mask_id, unmask_uniform, token_uniform
        )

    is_mask = torch.arange(vocab_size) == mask_id
    p_x0 = torch.softmax(logits.double().masked_fill(is_mask, -math.inf), dim=-1)
    expected = torch.where(is_mask, s / t, p_x0 * (t - s) / t)  # (L, V); the mask column is "stays masked"
    expected_counts = num_rows * expected
    observed_counts = torch.stack([torch.bincount(next_ids[:, i], minlength=vocab_size) for i in range(length)])
    assert expected_counts.sum(-1).tolist() == pytest.approx([num_rows] * length)
    assert expected_counts.min() > 50  # the chi-square approximation holds
    chi_square = ((observed_counts - expected_counts) ** 2 / expected_counts).sum().item()
    assert chi_square < CHI_SQUARE_15_DOF_AT_P_0_001


def test_unmask_first_step_edges():
    # Mask token last, token 0 without mass: u = 0 and the largest u < 1 must both land on tokens with mass.
    mask_id = 4
    logits = torch.tensor([[-math.inf, 0.0, 1.0, 0.5, 10.0]]).expand(4, -1)[None]
    noisy_ids = torch.tensor([[mask_id, mask_id, 2, mask_id]])
    cumulative_p_x0 = _cumulative_p_x0(subs_log_probs(logits, noisy_ids, mask_id))
    largest_below_one = 1 - 2**-53
    token_uniform = torch.tensor([[0.0, largest_below_one, largest_below_one, 0.5]], dtype=torch.float64)

    everything_unmasks = torch.zeros(1, 4, dtype=torch.float64)
    next_ids = _unmask_first_step(noisy_ids, cumulative_p_x0, 0.5, 0.2, mask_id, everything_unmasks, token_uniform)
    assert next_ids.tolist() == [[1, 3, 2, 2]]  # position 2 was unmasked and keeps its token

    nothing_unmasks = torch.full((1, 4), 0.7, dtype=torch.float64)  # above (t - s) / t = 0.6
    next_ids = _unmask_first_step(noisy_ids, cumulative_p_x0, 0.5, 0.2, mask_id, nothing_unmasks, token_uniform)
    assert torch.equal(next_ids, noisy_ids)


def test_unmask_first_sampler_matches_denoiser_and_never_changes_a_decided_token():
    num_rows = 4000
    prompt_ids = torch.tensor([[2, 0, 0, 0, 1, 0]]).expand(num_rows, -1)
    prompt_mask = torch.tensor([[True, False, False, False, True, False]]).expand(num_rows, -1)
    start_ids = initial_ids_from_prompt(prompt_ids, prompt_mask, SAMPLER_MASK_ID)
    seen_ids = []

    class RecordingDenoiser(FixedDenoiser):
        def __call__(self, noisy_ids):
            seen_ids.append(noisy_ids.clone())
            return super().__call__(noisy_ids)

    denoiser = RecordingDenoiser(TARGET_PROBS.repeat(2, 1))
    sample = sample_masked_diffusion(
        denoiser,
        start_ids,
        SAMPLER_MASK_ID,
        num_steps=16,
        use_cache=False,  # every step's ids reach the denoiser
        generator=torch.Generator().manual_seed(0),
        noise="unmask_first",
    )
    token_ids = sample.token_ids

    assert len(seen_ids) == 16 == sample.num_denoiser_calls
    for before, after in zip(seen_ids, [*seen_ids[1:], token_ids], strict=True):
        decided = before != SAMPLER_MASK_ID
        assert torch.equal(after[decided], before[decided])
    assert (token_ids != SAMPLER_MASK_ID).all()
    assert torch.equal(token_ids[prompt_mask], prompt_ids[prompt_mask])
    for position in (1, 2, 3, 5):
        frequencies = torch.bincount(token_ids[:, position], minlength=4).float() / num_rows
        assert (frequencies - TARGET_PROBS[position % 3]).abs().max() < 0.03


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unmask_first_cache_saves_calls_and_gives_identical_samples(seed):
    start_ids = torch.full((1, 2), SAMPLER_MASK_ID)
    probs = TARGET_PROBS[:2]
    cached, uncached = FixedDenoiser(probs), FixedDenoiser(probs)

    def run(denoiser, use_cache):
        generator = torch.Generator().manual_seed(seed)
        return sample_masked_diffusion(
            denoiser, start_ids, SAMPLER_MASK_ID, 64, use_cache=use_cache, generator=generator, noise="unmask_first"
        )

    with_cache, without_cache = run(cached, True), run(uncached, False)
    assert torch.equal(with_cache.token_ids, without_cache.token_ids)
    assert with_cache.num_denoiser_calls == cached.num_calls <= 3
    assert without_cache.num_denoiser_calls == uncached.num_calls >= 64


@pytest.mark.parametrize("seed", [0, 1])
def test_unmask_first_drawing_only_where_positions_unmask_gives_the_ids_of_drawing_everywhere(seed):
    """With the cache a step draws tokens only at the positions that unmask; without it, at every position. A
    denoiser whose logits depend on the whole input (as the network's do) makes both see the same ids each step."""
    vocab_size, mask_id = 11, 7
    table = torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(100 + seed))

    def denoiser(noisy_ids):
        context = torch.nn.functional.one_hot(noisy_ids, vocab_size).float().mean(dim=1, keepdim=True)  # (B, 1, V)
        return (torch.nn.functional.one_hot(noisy_ids, vocab_size).float() + context) @ table

    start_ids = torch.full((5, 9), mask_id)
    start_ids[1, :3] = torch.tensor([1, 2, 3])  # a prompted row

    def run(use_cache):
        generator = torch.Generator().manual_seed(seed)
        return sample_masked_diffusion(
            denoiser, start_ids, mask_id, 96, use_cache=use_cache, generator=generator, noise="unmask_first"
        )

    gathered, everywhere = run(True), run(False)
    assert torch.equal(gathered.token_ids, everywhere.token_ids)
    assert gathered.num_denoiser_calls < everywhere.num_denoiser_calls == 96
    assert (gathered.token_ids != mask_id).all() and gathered.token_ids[1, :3].tolist() == [1, 2, 3]


def test_unmask_first_generator_per_row_samples_each_row_as_it_would_alone():
    rows = 6
    start_ids = torch.full((rows, 3), SAMPLER_MASK_ID)
    start_ids[2, 0] = 1

    def run(ids, generators):
        return sample_masked_diffusion(
            FixedDenoiser(), ids, SAMPLER_MASK_ID, 8, generator=generators, noise="unmask_first"
        ).token_ids

    together = run(start_ids, [torch.Generator().manual_seed(seed) for seed in range(rows)])
    alone = torch.cat([run(start_ids[row : row + 1], torch.Generator().manual_seed(row)) for row in range(rows)])
    assert torch.equal(together, alone)
    assert len({tuple(row) for row in together.tolist()}) > 1


def test_sampler_rejects_unknown_noise():
    with pytest.raises(ValueError, match="gumbel.*unmask_first"):
        sample_masked_diffusion(FixedDenoiser(), torch.full((1, 3), SAMPLER_MASK_ID), SAMPLER_MASK_ID, 2, noise="x")


# ----------------------------------------------------------------------------- loss from the head's input

HEAD_MASK_ID = 4  # vocabulary of 11


def _head_problem(mask_pattern, dtype=torch.float32, with_bias=True):
    """Random head inputs and ids: B=3, L=7, D=8, V=11; noisy ids keep their clean token where unmasked."""
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(3, 7, 8, generator=generator).to(dtype).requires_grad_()
    head_weight = torch.randn(11, 8, generator=generator).to(dtype).requires_grad_()
    head_bias = torch.randn(11, generator=generator).to(dtype).requires_grad_() if with_bias else None
    clean_ids = torch.randint(0, 11, (3, 7), generator=generator)
    clean_ids[0, 0] = HEAD_MASK_ID  # a clean mask token: SUBS gives it log p = NEG_INF, both forms must agree
    is_masked = {
        "random": torch.rand(3, 7, generator=generator) < 0.5,
        "none": torch.zeros(3, 7, dtype=torch.bool),
        "all": torch.ones(3, 7, dtype=torch.bool),
    }[mask_pattern]
    noisy_ids = torch.where(is_masked, HEAD_MASK_ID, clean_ids)
    return hidden_states, head_weight, head_bias, noisy_ids, clean_ids


def _plain_and_chunked(hidden_states, head_weight, head_bias, noisy_ids, clean_ids, chunk_size, **loss_kwargs):
    sigma, dsigma = _schedule_at([0.3, 0.6, 0.9])
    logits = F.linear(hidden_states.float(), head_weight.float(), None if head_bias is None else head_bias.float())
    log_probs = subs_log_probs(logits, noisy_ids, HEAD_MASK_ID)
    plain = masked_diffusion_loss(log_probs, clean_ids, sigma, dsigma, **loss_kwargs)
    chunked = masked_diffusion_loss_from_hidden_states(
        hidden_states,
        head_weight,
        head_bias,
        noisy_ids,
        clean_ids,
        sigma,
        dsigma,
        HEAD_MASK_ID,
        chunk_size=chunk_size,
        **loss_kwargs,
    )
    return plain, chunked


def _assert_same_loss_and_gradients(plain, chunked, inputs, rtol, atol):
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(chunked.token_nll, plain.token_nll, rtol=rtol, atol=atol)
    assert torch.equal(chunked.num_tokens, plain.num_tokens)
    plain_grads = torch.autograd.grad(plain.loss, inputs)
    chunked_grads = torch.autograd.grad(chunked.loss, inputs)
    for chunked_grad, plain_grad in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(chunked_grad, plain_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mask_pattern", ["random", "none", "all"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("with_score_mask", [False, True])
def test_loss_from_hidden_states_equals_loss_from_logits(mask_pattern, normalization, with_score_mask):
    hidden_states, head_weight, head_bias, noisy_ids, clean_ids = _head_problem(mask_pattern)
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    score_mask = None
    if with_score_mask:
        score_mask = torch.zeros(3, 7, dtype=torch.bool)
        score_mask[:, 2:] = True
    for chunk_size in (1, 3, 64):
        plain, chunked = _plain_and_chunked(
            hidden_states,
            head_weight,
            head_bias,
            noisy_ids,
            clean_ids,
            chunk_size,
            score_mask=score_mask,
            attention_mask=attention_mask,
            normalization=normalization,
        )
        _assert_same_loss_and_gradients(plain, chunked, (hidden_states, head_weight, head_bias), 1e-5, 1e-5)


def test_loss_from_hidden_states_bfloat16_without_bias():
    hidden_states, head_weight, _, noisy_ids, clean_ids = _head_problem("random", torch.bfloat16, with_bias=False)
    plain, chunked = _plain_and_chunked(hidden_states, head_weight, None, noisy_ids, clean_ids, 3)
    assert chunked.loss.dtype == torch.float32
    _assert_same_loss_and_gradients(plain, chunked, (hidden_states, head_weight), 1e-5, 1e-5)


def test_loss_from_hidden_states_scores_an_unmasked_token_that_is_not_clean_like_subs():
    # x_t from `mask_tokens` never has one; SUBS then gives log p = NEG_INF at the clean token, and so does this.
    hidden_states, head_weight, head_bias, noisy_ids, clean_ids = _head_problem("random")
    unmasked = (noisy_ids != HEAD_MASK_ID).nonzero()[0].tolist()
    noisy_ids[tuple(unmasked)] = (clean_ids[tuple(unmasked)] + 1) % HEAD_MASK_ID
    plain, chunked = _plain_and_chunked(hidden_states, head_weight, head_bias, noisy_ids, clean_ids, 3)
    assert plain.loss > 1e5
    _assert_same_loss_and_gradients(plain, chunked, (hidden_states, head_weight, head_bias), 1e-5, 1e-5)


def test_loss_from_hidden_states_saves_no_logits_for_backward():
    # V large enough that a (chunk, V) tensor stands out among what autograd keeps.
    vocab_size, chunk_size = 5000, 4
    generator = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(2, 8, 16, generator=generator, requires_grad=True)
    head_weight = torch.randn(vocab_size, 16, generator=generator, requires_grad=True)
    clean_ids = torch.randint(0, vocab_size, (2, 8), generator=generator)
    noisy_ids = torch.where(torch.arange(8) % 2 == 0, HEAD_MASK_ID, clean_ids)  # 8 masked positions
    sigma, dsigma = _schedule_at([0.5, 0.5])
    saved_numels = []

    def pack(tensor):
        if tensor.data_ptr() != head_weight.data_ptr():  # the head's own weight is alive anyway
            saved_numels.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked = masked_diffusion_loss_from_hidden_states(
            hidden_states, head_weight, None, noisy_ids, clean_ids, sigma, dsigma, HEAD_MASK_ID, chunk_size=chunk_size
        )
    assert max(saved_numels) < chunk_size * vocab_size
    chunked.loss.backward()
    assert torch.isfinite(head_weight.grad).all()

    saved_numels.clear()  # the hook does see logits when they are kept: the plain path keeps (B, L, V) tensors
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        log_probs = subs_log_probs(hidden_states @ head_weight.T, noisy_ids, HEAD_MASK_ID)
        masked_diffusion_loss(log_probs, clean_ids, sigma, dsigma)
    assert max(saved_numels) >= 16 * vocab_size


def test_loss_from_hidden_states_rejects_unknown_normalization():
    hidden_states, head_weight, head_bias, noisy_ids, clean_ids = _head_problem("random")
    with pytest.raises(ValueError, match="batch_length.*real_tokens"):
        masked_diffusion_loss_from_hidden_states(
            hidden_states,
            head_weight,
            head_bias,
            noisy_ids,
            clean_ids,
            *_schedule_at([0.5, 0.5, 0.5]),
            HEAD_MASK_ID,
            normalization="mean",
        )
