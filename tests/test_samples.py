"""Validation sampling with tiny real components: image and caption shapes, seeding, edit guidance and VQA."""

import numpy as np
import pytest
import torch
from torch import nn

from unialignment.data.features import FrozenComponents
from unialignment.toy.components import load_tiny_components, make_tiny_components
from unialignment.toy.shapes import ShapeScene, draw_scene
from unialignment.toy.transformer import make_tiny_transformer
from unialignment.training.samples import edit_images, generate_captions, generate_images, image_grid

PROMPTS = ["a red circle on the left", "a blue square at the top"]
HEIGHT, WIDTH = 32, 48  # not square, so that a swapped height and width shows


class RecordingModel(nn.Module):
    """Forwards to the transformer and records what each call saw; can force the text head onto one token."""

    def __init__(self, model: nn.Module, forced_token_id: int | None = None):
        super().__init__()
        self.model = model
        self.forced_token_id = forced_token_id
        self.calls = []

    def forward(self, hidden_states, encoder_hidden_states, timestep, condition_latents=None, **kwargs):
        self.calls.append(
            {"prompt_states": encoder_hidden_states, "conditions": condition_latents, "training": self.training}
        )
        output = self.model(hidden_states, encoder_hidden_states, timestep, condition_latents, **kwargs)
        if self.forced_token_id is not None:
            forced_logits = torch.full_like(output.text_logits, -100.0)
            forced_logits[..., self.forced_token_id] = 100.0
            output.text_logits = forced_logits
        return output


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    tiny = load_tiny_components(make_tiny_components(tmp_path_factory.mktemp("components")), max_text_length=16)
    return FrozenComponents(tiny.t5, tiny.vae, tiny.teacher)


@pytest.fixture(scope="module")
def transformer(components):
    t5, vae = components.t5, components.vae
    return make_tiny_transformer(
        in_channels=vae.latent_channels,
        out_channels=vae.latent_channels,
        joint_attention_dim=t5.hidden_size,
        vocab_size=t5.vocab_size,
        teacher_dim=components.teacher.dim,
    )


@pytest.fixture(scope="module")
def source_images():
    # 40 px sources: resized and cropped to (HEIGHT, WIDTH) inside.
    return [draw_scene(ShapeScene("red", "circle", "left"), 40), draw_scene(ShapeScene("blue", "square", "top"), 40)]


def _generate(transformer, components, seed, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return generate_images(transformer, components, PROMPTS, HEIGHT, WIDTH, num_steps=3, generator=generator, **kwargs)


def test_generate_images_size_count_and_mode(transformer, components):
    model = RecordingModel(transformer).train()
    images = _generate(model, components, seed=0)
    assert len(images) == len(PROMPTS)
    assert all(image.size == (WIDTH, HEIGHT) and image.mode == "RGB" for image in images)
    assert model.training, "the caller's train mode is restored"
    assert len(model.calls) == 3 and not any(call["training"] for call in model.calls)
    # CFG: [null prompt; prompts] in one batch.
    prompt_states = model.calls[0]["prompt_states"]
    assert prompt_states.shape[0] == 2 * len(PROMPTS)
    assert torch.equal(prompt_states[0], components.t5.null_prompt_embeds()[0])


def test_generate_images_without_guidance_runs_one_half(transformer, components):
    model = RecordingModel(transformer)
    images = _generate(model, components, seed=0, guidance_scale=1.0)
    assert len(images) == len(PROMPTS)
    assert all(call["prompt_states"].shape[0] == len(PROMPTS) for call in model.calls)


def test_generate_images_is_reproducible_by_seed(transformer, components):
    first, again, other = (_generate(transformer, components, seed) for seed in (0, 0, 1))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, other, strict=True))


def test_edit_keeps_the_condition_image_in_both_guidance_halves(transformer, components, source_images):
    model = RecordingModel(transformer)
    generator = torch.Generator().manual_seed(0)
    instructions = ["make it green", "make it yellow"]
    edited = edit_images(model, components, source_images, instructions, HEIGHT, WIDTH, 2, generator=generator)
    assert len(edited) == 2 and all(image.size == (WIDTH, HEIGHT) for image in edited)
    assert len(model.calls) == 2
    vae = components.vae
    latent_size = (HEIGHT // vae.downsample_factor, WIDTH // vae.downsample_factor)
    for call in model.calls:
        (condition,) = call["conditions"]
        assert condition.shape == (4, vae.latent_channels, *latent_size)
        assert torch.equal(condition[:2], condition[2:]), "the unconditional half keeps the source image"
        assert not torch.equal(condition[0], condition[1])
        assert torch.equal(call["prompt_states"][:2], components.t5.null_prompt_embeds(2))


def test_captions_are_clean_strings(transformer, components, source_images, monkeypatch):
    t5 = components.t5
    decoded_ids = []
    decode = t5.decode
    monkeypatch.setattr(t5, "decode", lambda ids: decoded_ids.extend(ids) or decode(ids))
    generator = torch.Generator().manual_seed(0)
    captions = generate_captions(transformer, components, source_images, HEIGHT, WIDTH, 4, generator=generator)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)
    assert not any("</s>" in caption or "<extra_id_0>" in caption for caption in captions)
    assert [len(ids) for ids in decoded_ids] == [t5.max_length] * 2
    assert all(t5.mask_token_id not in ids for ids in decoded_ids), "sampling leaves no mask token"


def test_vqa_answers_leave_the_question_out(transformer, components, source_images):
    t5 = components.t5
    forced_id = t5.tokenizer("circle", add_special_tokens=False).input_ids[0]
    questions = ["what shape is on the left", "what is at the top"]
    question_lengths = [len(t5.tokenizer(question, add_special_tokens=False).input_ids) for question in questions]
    length = 20  # longer than the T5 max_length of 16: the text length is free

    # Text head forced onto one token: every answer position becomes it, the question positions stay and are cut.
    model = RecordingModel(transformer, forced_token_id=forced_id)
    answers = generate_captions(model, components, source_images, HEIGHT, WIDTH, 3, length, questions)
    assert answers == [t5.tokenizer.decode([forced_id] * (length - n)) for n in question_lengths]

    answers = generate_captions(transformer, components, source_images, HEIGHT, WIDTH, 3, length, questions)
    assert all(question not in answer for question, answer in zip(questions, answers, strict=True))


def test_image_grid_layout(source_images):
    grid = image_grid(source_images * 3, columns=4)
    assert grid.size == (4 * 40, 2 * 40)
