"""The UniAlignment micro-step: gradients reach exactly the trainable weights, and each loss term can be driven
down by overfitting one batch with tiny real components."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unialignment.data.features import TrainingBatch
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.toy.t5 import make_tiny_t5
from unialignment.toy.transformer import make_tiny_transformer
from unialignment.training.objective import LossWeights, ObjectiveConfig, UniAlignmentObjective

CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green star in the middle", "a pink heart"]
TEACHER_DIM = 10


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    tokenizer_dir, encoder_dir = make_tiny_t5(tmp_path_factory.mktemp("t5"))
    return FrozenT5.from_pretrained(tokenizer_dir, encoder_dir, max_length=16)


def _transformer(t5, **overrides):
    return make_tiny_transformer(joint_attention_dim=t5.hidden_size, vocab_size=t5.vocab_size, **overrides)


def _batch(t5, with_condition=False, answer_only=False):
    generator = torch.Generator().manual_seed(1)
    tokens = t5.tokenize(CAPTIONS)
    score_mask = None
    if answer_only:  # a VQA-style record: the first 3 tokens are the question and stay clean
        score_mask = torch.ones_like(tokens.input_ids, dtype=torch.bool)
        score_mask[:, :3] = False
    return TrainingBatch(
        target_latents=torch.randn(4, 4, 8, 8, generator=generator),
        prompt_embeds=t5.encode(CAPTIONS),
        caption_ids=tokens.input_ids,
        condition_latents=[torch.randn(4, 4, 8, 8, generator=generator)] if with_condition else None,
        caption_score_mask=score_mask,
        caption_attention_mask=tokens.attention_mask,
        teacher_image_targets=torch.randn(4, TEACHER_DIM, generator=generator),
        teacher_text_targets=torch.randn(4, TEACHER_DIM, generator=generator),
    )


def _objective(t5, **config):
    return UniAlignmentObjective(
        ObjectiveConfig(**config),
        FlowMatchEulerDiscreteScheduler(),
        t5.mask_token_id,
        t5.encode_ids,
        t5.null_prompt_embeds(),
    )


def test_gradients_reach_exactly_the_trainable_weights(t5):
    model = _transformer(t5)
    losses = _objective(t5)(model, _batch(t5, with_condition=True), torch.Generator().manual_seed(0))
    losses.total.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # Every weight trains except the null image, which only text-only samples use.
    assert with_grad == {name for name, _ in model.named_parameters()} - {"null_image_embd"}
    assert all(p.grad is None and not p.requires_grad for p in t5.encoder.parameters())
    for name in ("image", "text", "contrastive", "align_image", "align_text"):
        assert getattr(losses, name).item() > 0, name


def test_switched_off_terms_leave_their_heads_untouched(t5):
    model = _transformer(t5)
    weights = LossWeights(contrastive=0.0, align_image=0.0, align_text=0.0)
    losses = _objective(t5, weights=weights)(model, _batch(t5), torch.Generator().manual_seed(0))
    losses.total.backward()
    assert model.siglip_adapter_img.fc[0].weight.grad is None and model.siglip_adapter_text.fc[0].weight.grad is None
    assert losses.contrastive.item() == losses.align_image.item() == 0.0


def test_null_image_trains_on_text_only_samples(t5):
    model = _transformer(t5)
    batch = _batch(t5)
    batch.text_stream_uses_null_image = True
    _objective(t5)(model, batch, torch.Generator().manual_seed(0)).total.backward()
    assert model.null_image_embd.grad.abs().sum() > 0


def test_prompted_text_loss_scores_only_the_answer(t5):
    model = _transformer(t5)
    objective = _objective(t5, text_loss_normalization="real_tokens")
    seen = []
    original = objective.encode_text_ids
    objective.encode_text_ids = lambda ids: seen.append(ids.clone()) or original(ids)
    objective(model, _batch(t5, answer_only=True), torch.Generator().manual_seed(0))
    noisy = seen[0]
    assert not (noisy[:, :3] == t5.mask_token_id).any()


def test_same_generator_state_gives_the_same_losses(t5):
    model, objective, batch = _transformer(t5), _objective(t5), _batch(t5, with_condition=True)
    first = objective(model, batch, torch.Generator().manual_seed(5)).scalars()
    second = objective(model, batch, torch.Generator().manual_seed(5)).scalars()
    assert first == second


def test_overfitting_one_batch_drives_every_term_down(t5):
    model = _transformer(t5)
    objective, batch = _objective(t5, condition_dropout=0.0), _batch(t5, with_condition=True)

    def evaluate():
        # The same timesteps, noise and masks before and after: only the weights differ.
        with torch.no_grad():
            runs = [objective(model, batch, torch.Generator().manual_seed(seed)).scalars() for seed in range(4)]
        return {term: sum(run[term] for run in runs) / len(runs) for term in runs[0]}

    before = evaluate()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, foreach=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        losses = objective(model, batch, generator)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
    after = evaluate()
    for term in ("total", "image", "text", "contrastive", "align_image", "align_text"):
        assert after[term] < 0.7 * before[term], f"{term}: {before[term]:.4f} -> {after[term]:.4f}"
