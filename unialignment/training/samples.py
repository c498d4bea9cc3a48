"""Samples during training: images for fixed prompts and edits, captions for fixed images, from the model being
trained, written into the run folder and TensorBoard so a run can be judged by eye."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unialignment.data.transforms import load_image
from unialignment.pipelines import UniAlignmentPipeline, image_grid
from unialignment.training.builders import TrainingRig

logger = logging.getLogger("unialignment.train")


def sample_outputs(rig: TrainingRig) -> tuple[dict[str, list], list[str]]:
    """The configured samples from the rig's transformer: ({"t2i": images, "edit": images}, captions). Under ZeRO-3
    every rank must call this (the weights are partitioned)."""
    config = rig.config
    settings, resolution, t5 = config.logging, config.data.resolution, rig.components.t5
    # The tokenizer records the training text length (load_t5_tokenizer), which is what the pipeline reads.
    pipeline = UniAlignmentPipeline(
        transformer=rig.engine.module,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=rig.components.vae.vae,
        text_encoder=t5.encoder,
        tokenizer=t5.tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(config.seed)
    size = dict(height=resolution, width=resolution)
    image_settings = dict(
        size, num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance_scale, generator=generator
    )
    rig.engine.eval()
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
    rig.engine.train()
    return outputs, captions


def write_samples(
    folder: Path, outputs: dict[str, list], captions: list[str], caption_images: list[str], writer, step: int
) -> None:
    """Grids as `<task>.png` and the captions as `captions.txt` in `folder`, and both in TensorBoard."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, images in outputs.items():
        grid = image_grid(images, columns=min(4, len(images)))
        grid.save(folder / f"{name}.png")
        writer.add_image(f"samples/{name}", np.asarray(grid), step, dataformats="HWC")
    if captions:
        text = "\n".join(f"{path}: {caption}" for path, caption in zip(caption_images, captions, strict=True))
        (folder / "captions.txt").write_text(text + "\n")
        writer.add_text("samples/captions", text, step)
    logger.info("samples written to %s", folder)
