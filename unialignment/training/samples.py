"""Samples for fixed validation inputs: images from prompts, edits from instructions, captions and answers.

The trainer logs these as training goes; the inference pipeline can reuse them. Both samplers are the ones of
SPEC sections 3 and 4: Euler over rectified flow with classifier-free guidance for images, MDLM ancestral
sampling for text. `model` is the transformer or anything that forwards like it and has `.parameters()`
(a DeepSpeed engine, an EMA copy); its dtype and device are read from its first parameter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from torch import nn

from unialignment.data.features import FrozenComponents
from unialignment.data.tokenization import tokenize_captions
from unialignment.data.transforms import resize_and_center_crop, to_pixels
from unialignment.diffusion.flow_matching import sample_rectified_flow
from unialignment.diffusion.masked_diffusion import initial_ids_from_prompt, sample_masked_diffusion
from unialignment.frozen.vae import FrozenVAE, pixels_to_pil


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Sample in eval mode and give the model back in the mode the caller had it in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    parameter = next(model.parameters())
    return parameter.dtype, parameter.device


def _check_size(vae: FrozenVAE, height: int, width: int) -> None:
    factor = vae.downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of the VAE downsampling {factor}, got {height}x{width}.")


def _clean_latents(vae: FrozenVAE, images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """Images resized and centre-cropped to (height, width) -> scaled posterior means (B, C, h, w).

    The mean, not a draw: a condition or captioned image should be the image itself, not a noisy copy.
    """
    _check_size(vae, height, width)
    pixels = torch.stack([to_pixels(resize_and_center_crop(image, height, width)) for image in images])
    mean, _ = vae.latent_distribution(pixels)
    return vae.scale(mean)


def _sample_images(
    model: nn.Module,
    components: FrozenComponents,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    condition_latents: torch.Tensor | None,
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None,
    scheduler: FlowMatchEulerDiscreteScheduler | None,
) -> list[Image.Image]:
    """Rectified-flow sampling shared by generation and editing; prompt_embeds (B, L, D), condition (B, C, h, w)."""
    vae = components.vae
    _check_size(vae, height, width)
    dtype, device = _dtype_and_device(model)
    batch_size = prompt_embeds.shape[0]

    prompt_states = prompt_embeds
    if guidance_scale > 1.0:
        # One batch of [unconditional; conditional], the order `sample_rectified_flow` expects.
        if negative_prompt_embeds is None:
            negative_prompt_embeds = components.t5.null_prompt_embeds()
        negative_prompt_embeds = negative_prompt_embeds.to(prompt_embeds.device).expand_as(prompt_embeds)
        prompt_states = torch.cat([negative_prompt_embeds, prompt_embeds])
        if condition_latents is not None:
            # Edit CFG drops only the text: both halves see the source image.
            condition_latents = torch.cat([condition_latents, condition_latents])
    prompt_states = prompt_states.to(device, dtype)
    conditions = None if condition_latents is None else [condition_latents.to(device, dtype)]

    def velocity(latent_input: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        output = model(latent_input.to(dtype), prompt_states, timesteps, conditions)
        # float32 so that the Euler steps accumulate in full precision whatever the model's dtype.
        return output.velocity.float()

    # Drawn on the CPU so that a seed gives the same noise on any device.
    latent_shape = (batch_size, vae.latent_channels, height // vae.downsample_factor, width // vae.downsample_factor)
    noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32)
    scheduler = scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler()
    latents = sample_rectified_flow(velocity, noise.to(device), scheduler, num_steps, guidance_scale)
    return pixels_to_pil(vae.decode(latents))


@torch.no_grad()
def generate_images(
    model: nn.Module,
    components: FrozenComponents,
    prompts: list[str],
    height: int,
    width: int,
    num_steps: int = 28,
    guidance_scale: float = 7.0,
    generator: torch.Generator | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
) -> list[Image.Image]:
    """Text to image: one (width x height) image per prompt.

    negative_prompt_embeds: (1 or B, L, D) T5 states of the unconditional half; default the null prompt.
    scheduler: default `FlowMatchEulerDiscreteScheduler()` (shift 1.0); its `set_timesteps` is called here.
    generator: a CPU generator for the initial noise.
    """
    prompt_embeds = components.t5.encode(prompts)
    with _eval_mode(model):
        return _sample_images(
            model,
            components,
            prompt_embeds,
            negative_prompt_embeds,
            None,
            height,
            width,
            num_steps,
            guidance_scale,
            generator,
            scheduler,
        )


@torch.no_grad()
def edit_images(
    model: nn.Module,
    components: FrozenComponents,
    images: list[Image.Image],
    instructions: list[str],
    height: int,
    width: int,
    num_steps: int = 28,
    guidance_scale: float = 9.0,
    generator: torch.Generator | None = None,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
) -> list[Image.Image]:
    """Instruction editing: each source image, resized and centre-cropped to (height, width), is the condition
    image of its instruction; the unconditional half keeps the image and uses the null prompt."""
    if len(images) != len(instructions):
        raise ValueError(f"got {len(images)} images for {len(instructions)} instructions; pass one per image.")
    condition_latents = _clean_latents(components.vae, images, height, width)
    prompt_embeds = components.t5.encode(instructions)
    with _eval_mode(model):
        return _sample_images(
            model,
            components,
            prompt_embeds,
            None,
            condition_latents,
            height,
            width,
            num_steps,
            guidance_scale,
            generator,
            scheduler,
        )


@torch.no_grad()
def generate_captions(
    model: nn.Module,
    components: FrozenComponents,
    images: list[Image.Image],
    height: int,
    width: int,
    num_steps: int = 32,
    length: int | None = None,
    questions: list[str] | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Image to text through the text stream: a caption per image, or with `questions` an answer per image.

    The image stream holds the clean image latents at timestep 0; the text starts as `length` mask tokens
    (default the T5 length), with the question's tokens kept clean for VQA. Returned texts stop at the first
    `</s>` and leave out the question.

    generator: a CPU or device generator for the sampler's Gumbel noise.
    """
    t5 = components.t5
    length = t5.max_length if length is None else length
    dtype, device = _dtype_and_device(model)
    image_latents = _clean_latents(components.vae, images, height, width).to(device, dtype)

    # An empty answer after each question: the score mask then marks every position after the question.
    prompt = tokenize_captions(t5.tokenizer, [""] * len(images), questions, max_length=length)
    question_mask = ~prompt.score_mask
    initial_ids = initial_ids_from_prompt(prompt.input_ids, question_mask, t5.mask_token_id).to(device)

    text_stream_timesteps = torch.zeros(len(images), device=device)

    def text_logits(noisy_ids: torch.Tensor) -> torch.Tensor:
        noisy_text_embeds = t5.encode_ids(noisy_ids).to(device, dtype)
        output = model(
            image_latents, noisy_text_embeds, text_stream_timesteps, return_velocity=False, return_text_logits=True
        )
        return output.text_logits.float()

    with _eval_mode(model):
        sample = sample_masked_diffusion(text_logits, initial_ids, t5.mask_token_id, num_steps, generator=generator)
    question_lengths = question_mask.sum(dim=1).tolist()
    sampled_ids = sample.token_ids.tolist()
    answers = [ids[num_question:] for ids, num_question in zip(sampled_ids, question_lengths, strict=True)]
    return t5.decode(answers)


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste images row by row into one grid image; each cell is the size of the largest image."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    cell_width = max(image.width for image in images)
    cell_height = max(image.height for image in images)
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (column * cell_width, row * cell_height))
    return grid
