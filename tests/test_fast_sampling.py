"""The pipeline's sampling speed-ups against the plain path with tiny real components: the null prompt's T5 states
computed once, the caption's first T5 call for one row, no index lookup in the denoising loop, and compiled blocks
with a channels-last VAE giving the eager images (inductor runs on the CPU; CUDA graphs need a GPU)."""

from contextlib import contextmanager

import pytest
import torch
from transformers import T5EncoderModel

from unialignment.frozen.text_encoder import FrozenT5
from unialignment.pipelines.pipeline_unialignment import NULL_PROMPT
from unialignment.toy.components import make_tiny_components, make_tiny_pipeline
from unialignment.toy.shapes import ShapeScene, draw_scene

PROMPTS = ["a red circle on the left", "a blue square at the top"]
SIZE = dict(height=32, width=32)


def _pipeline(folders, seed=0):
    return make_tiny_pipeline(folders, 16, seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_tiny_components(tmp_path_factory.mktemp("components"))


@pytest.fixture(scope="module")
def sources():
    return [draw_scene(ShapeScene("red", "circle", "left"), 40), draw_scene(ShapeScene("blue", "square", "top"), 40)]


@contextmanager
def _encoded_batches(text_encoder):
    """The batch size of every text-encoder call inside the block."""
    sizes = []
    handle = text_encoder.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


def _generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_the_null_prompt_is_encoded_once_per_pipeline(folders):
    pipe = _pipeline(folders)
    kwargs = dict(num_inference_steps=2, output_type="latent", **SIZE)
    with _encoded_batches(pipe.text_encoder) as sizes:
        first = pipe.text_to_image(PROMPTS, generator=_generators(0, 1), **kwargs).images
        again = pipe.text_to_image(PROMPTS, generator=_generators(0, 1), **kwargs).images
        pipe.text_to_image(PROMPTS, negative_prompt="blurry", generator=_generators(0, 1), **kwargs)
    assert sizes == [1, 2, 2, 4]  # the null prompt, then the prompts; a given negative prompt is encoded
    assert torch.equal(first, again)
    # The cached states are the null prompt's, as encoding it with the prompts gives them.
    t5 = FrozenT5(pipe.tokenizer, pipe.text_encoder, pipe.text_max_length)
    together = t5.encode([NULL_PROMPT, NULL_PROMPT, *PROMPTS])
    torch.testing.assert_close(pipe._encode_texts([NULL_PROMPT] * 2 + PROMPTS, "cpu", torch.float32), together)


def test_a_new_text_encoder_gets_its_own_null_prompt(folders):
    pipe = _pipeline(folders)
    before = pipe._encode_texts([NULL_PROMPT], "cpu", torch.float32)
    pipe.text_encoder = T5EncoderModel.from_pretrained(folders.text_encoder)
    with torch.no_grad():
        pipe.text_encoder.shared.weight.mul_(2.0)
    assert not torch.allclose(pipe._encode_texts([NULL_PROMPT], "cpu", torch.float32), before)


def test_a_caption_batch_encodes_its_common_start_once(folders, sources):
    pipe = _pipeline(folders)
    with _encoded_batches(pipe.text_encoder) as sizes:
        pipe.caption(sources, length=12, num_inference_steps=4, generator=torch.Generator().manual_seed(0), **SIZE)
    assert sizes[0] == 1 and all(size == 2 for size in sizes[1:]) and len(sizes) >= 2
    with _encoded_batches(pipe.text_encoder) as sizes:  # questions differ: the start differs per row
        pipe.answer(sources, ["what is it", "which colour"], length=12, num_inference_steps=4, **SIZE)
    assert sizes[0] == 2


@pytest.mark.parametrize("sampler", ["unmask_first", "gumbel"])
def test_both_caption_samplers_give_each_image_what_it_gets_alone(folders, sources, sampler):
    pipe = _pipeline(folders)
    kwargs = dict(length=12, num_inference_steps=6, sampler=sampler, **SIZE)
    batched = pipe.caption(sources, generator=_generators(3, 4), **kwargs).texts
    pairs = zip(sources, (3, 4), strict=True)
    alone = [pipe.caption([image], generator=_generators(seed), **kwargs).texts[0] for image, seed in pairs]
    assert batched == alone


def test_the_denoising_loop_never_looks_its_step_up(folders, monkeypatch):
    """`index_for_timestep` reads the device (a host synchronisation); the loop tells the scheduler where it starts."""
    pipe = _pipeline(folders)

    def forbidden(*args, **kwargs):
        raise AssertionError("the scheduler looked its step index up")

    monkeypatch.setattr(pipe.scheduler, "index_for_timestep", forbidden)
    images = pipe.text_to_image(PROMPTS[0], num_inference_steps=3, output_type="latent", **SIZE).images
    assert torch.isfinite(images).all()


def test_compiled_blocks_and_a_channels_last_vae_give_the_eager_images(folders, sources):
    torch._dynamo.reset()
    eager, fast = _pipeline(folders), _pipeline(folders)
    fast.enable_fast_sampling(compile_blocks=True, cuda_graphs=False, channels_last_vae=True)
    assert fast.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    kwargs = dict(num_inference_steps=3, output_type="np", **SIZE)
    for pipe_call in (
        lambda pipe: pipe.text_to_image(PROMPTS, generator=_generators(0, 1), **kwargs).images,
        lambda pipe: (
            pipe.edit(sources, ["make it green", "make it pink"], generator=_generators(0, 1), **kwargs).images
        ),
    ):
        torch.testing.assert_close(
            torch.from_numpy(pipe_call(fast)), torch.from_numpy(pipe_call(eager)), atol=2e-3, rtol=0
        )
    # The text head's logits agree as closely (a sampled caption could flip at a near tie, so they are compared).
    latents = fast._encode_images(sources, 32, 32, "cpu", torch.float32)
    ids = torch.full((2, 12), FrozenT5(fast.tokenizer, fast.text_encoder, 12).mask_token_id)
    states = fast.text_encoder(ids).last_hidden_state
    outputs = [
        pipe.transformer(latents, states, torch.zeros(2), return_velocity=False, return_text_logits=True).text_logits
        for pipe in (fast, eager)
    ]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
