"""Samples during training, so that a run can be judged by eye: images for fixed prompts, edits shown as
source | output, captions for fixed images, each tile labelled with its text, from the EMA weights (the weights
exports default to) or the raw ones, with a fixed seed so that the grids of one run compare step to step.

The grids go into the run folder (`samples/<step>/<task>.png`, `captions.txt`) and to the tracker.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image, ImageDraw, ImageFont

from unialignment.data.transforms import load_image, resize_and_center_crop
from unialignment.frozen.components import FrozenComponents
from unialignment.models import UniAlignmentTransformer
from unialignment.pipelines import UniAlignmentPipeline, image_grid
from unialignment.training.checkpoint import with_ema
from unialignment.training.config import TrainConfig

logger = logging.getLogger("unialignment.train")
MIN_TILE_WIDTH = 128  # small images are enlarged (nearest neighbour) so that a label fits under them
LABEL_LINE_HEIGHT = 12


def sampling_model(module, raw: dict, ema: dict | None, device: torch.device) -> torch.nn.Module:
    """A copy of the trained transformer holding the EMA weights (or, without `ema`, the raw ones) on `device`.
    Built without touching the run's random state, which a resumed run must find as the uninterrupted one had it."""
    state = with_ema(raw, ema, lora=False) if ema is not None else raw
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        model = UniAlignmentTransformer.from_config(module.config)
        if getattr(module, "peft_config", None):  # a LoRA run: the same adapters, then the trained values
            model.add_adapter(module.peft_config["default"])
    dtype = next(module.parameters()).dtype
    model.load_state_dict({name: tensor.to(device) for name, tensor in state.items()})
    model = model if dtype == torch.float32 else model.to(dtype)  # built in float32; bf16 runs sample in bf16
    return model.eval().requires_grad_(False)


def sample_outputs(
    model: torch.nn.Module, components: FrozenComponents, config: TrainConfig
) -> tuple[dict[str, list], list[str]]:
    """The configured samples: ({"t2i": images, "edit": images}, captions), the generator seeded by `config.seed`."""
    settings, resolution, t5 = config.logging, config.data.resolution, components.t5
    # The tokenizer records the training text length (load_t5_tokenizer), which is what the pipeline reads.
    pipeline = UniAlignmentPipeline(
        model, FlowMatchEulerDiscreteScheduler(), components.vae.vae, t5.encoder, t5.tokenizer
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(config.seed)
    size = dict(height=resolution, width=resolution)
    image_settings = dict(
        size, num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance_scale, generator=generator
    )
    outputs = {}
    if settings.sample_prompts:
        outputs["t2i"] = pipeline.text_to_image(settings.sample_prompts, **image_settings).images
    if settings.sample_edits:
        sources = [load_image(edit["image"]) for edit in settings.sample_edits]
        instructions = [edit["instruction"] for edit in settings.sample_edits]
        outputs["edit"] = pipeline.edit(sources, instructions, **image_settings).images
    captions = []
    if settings.caption_images:
        images = [load_image(path) for path in settings.caption_images]
        captions = pipeline.caption(
            images, length=t5.max_length, num_inference_steps=settings.caption_steps, generator=generator, **size
        ).texts
    return outputs, captions


def label_strip(text: str, width: int) -> Image.Image:
    """`text` wrapped to `width` pixels, black on white, as an image `width` wide."""
    font = ImageFont.load_default()
    characters = max(1, width // 6)  # the default font's characters are about 6 px wide
    lines = textwrap.wrap(text, characters) or [""]
    strip = Image.new("RGB", (width, LABEL_LINE_HEIGHT * len(lines) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for number, line in enumerate(lines):
        draw.text((2, 2 + LABEL_LINE_HEIGHT * number), line, fill="black", font=font)
    return strip


def labelled_tile(images: list[Image.Image], text: str) -> Image.Image:
    """`images` side by side (enlarged when small), with `text` under them."""
    scale = max(1, -(-MIN_TILE_WIDTH // images[-1].width))
    images = [image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) for image in images]
    width, height = sum(image.width for image in images), max(image.height for image in images)
    strip = label_strip(text, width)
    tile = Image.new("RGB", (width, height + strip.height), "white")
    left = 0
    for image in images:
        tile.paste(image.convert("RGB"), (left, 0))
        left += image.width
    tile.paste(strip, (0, height))
    return tile


def sample_grids(config: TrainConfig, outputs: dict[str, list], captions: list[str]) -> dict[str, Image.Image]:
    """Labelled grids: each text-to-image tile with its prompt, each edit as source | output with its instruction,
    each captioned image with its caption."""
    settings, resolution = config.logging, config.data.resolution
    tiles = {}
    if "t2i" in outputs:
        prompts = settings.sample_prompts
        tiles["t2i"] = [labelled_tile([image], prompt) for image, prompt in zip(outputs["t2i"], prompts, strict=True)]
    if "edit" in outputs:
        tiles["edit"] = [
            labelled_tile([_square(load_image(edit["image"]), resolution), image], edit["instruction"])
            for image, edit in zip(outputs["edit"], settings.sample_edits, strict=True)
        ]
    if captions:
        images = [_square(load_image(path), resolution) for path in settings.caption_images]
        tiles["captions"] = [labelled_tile([image], caption) for image, caption in zip(images, captions, strict=True)]
    return {name: image_grid(group, columns=min(4, len(group))) for name, group in tiles.items()}


def _square(image: Image.Image, size: int) -> Image.Image:
    return resize_and_center_crop(image, size, size)


def write_samples(folder: Path, grids: dict[str, Image.Image], captions: list[str], caption_images: list[str]) -> None:
    """The grids as `<task>.png` and the captions as `captions.txt` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, grid in grids.items():
        grid.save(folder / f"{name}.png")
    if captions:
        text = "\n".join(f"{path}: {caption}" for path, caption in zip(caption_images, captions, strict=True))
        (folder / "captions.txt").write_text(text + "\n")
    logger.info("samples written to %s", folder)
