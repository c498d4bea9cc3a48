"""The benchmark's workload and timing: synthetic micro-batches as the dataset yields them, the trainer's own
optimizer step timed on them (`unialignment.training.step.optimizer_step`), and the pipeline's text-to-image and
captioning calls timed."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unialignment.benchmark.full_size import transformer_kwargs
from unialignment.data.collate import Collator, RawBatch
from unialignment.data.dataset import Sample
from unialignment.data.features import TrainingBatch, compute_features, prepare_training_batch, write_feature_cache
from unialignment.data.records import TaskKind
from unialignment.frozen.components import FrozenComponents
from unialignment.frozen.random_weights import build_with_random_weights
from unialignment.models import UniAlignmentTransformer
from unialignment.pipelines import UniAlignmentPipeline
from unialignment.toy.t5 import caption_corpus
from unialignment.training.builders import TrainingRig
from unialignment.training.config import TrainConfig
from unialignment.training.flops import training_flops_per_sample
from unialignment.training.objective import UniAlignmentObjective
from unialignment.training.step import StepResult, optimizer_step

FEATURE_MODES = {
    "online": "T5, VAE and teacher every step",
    "cache": "feature cache, T5 on the noisy caption only",
    "transformer": "none (transformer only)",
}

GiB = 2**30


# --- the workload ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Token counts of one sample of the transformer: target image, condition images, text."""

    image: int
    condition: int
    text: int


def token_counts(task: str, resolution: int, components: FrozenComponents, model_config) -> Tokens:
    side = resolution // components.vae.downsample_factor // model_config.patch_size
    return Tokens(side * side, side * side if task == "edit" else 0, components.t5.max_length)


def synthetic_samples(task: str, batch_size: int, resolution: int, generator: torch.Generator) -> list[Sample]:
    """A micro-batch as the dataset yields it: random pixels in [-1, 1] (no encoder's cost depends on what the
    image shows), captions of the toy corpus; an edit has one source image and an instruction."""
    corpus = caption_corpus()

    def pixels() -> torch.Tensor:
        return torch.rand(3, resolution, resolution, generator=generator) * 2 - 1

    samples = []
    for row in range(batch_size):
        caption = corpus[row % len(corpus)]
        samples.append(
            Sample(
                task=TaskKind.TEXT_TO_IMAGE if task == "t2i" else TaskKind.EDIT,
                group=0,
                num_sources=0 if task == "t2i" else 1,
                target_pixels=pixels(),
                source_pixels=[] if task == "t2i" else [pixels()],
                features=None,
                prompt=caption if task == "t2i" else f"Make it look like this: {corpus[-1 - row]}",
                caption=caption,
                question="",
                location=f"synthetic:{row}",
                record_key=("synthetic", row),
                step=0,
                micro_step=0,
            )
        )
    return samples


def cached(samples: list[Sample], components: FrozenComponents, collator: Collator) -> list[Sample]:
    """The same samples as the feature cache gives them: the frozen components' outputs, stored as
    `write_feature_cache` stores them, in place of the pixels."""
    storage_dtype = inspect.signature(write_feature_cache).parameters["storage_dtype"].default
    features = compute_features(collator(samples), components)
    return [
        dataclasses.replace(
            sample,
            target_pixels=None,
            source_pixels=None,
            features={name: value[row].cpu().to(storage_dtype) for name, value in features.items()},
        )
        for row, sample in enumerate(samples)
    ]


# --- timing ---------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def timed(call: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones, the device synchronised around each."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 1. training ----------------------------------------------------------------------------------------------------


def batch_tokens(batch: TrainingBatch, patch_size: int) -> Tokens:
    """Token counts of a prepared batch, as `batch_flops` reads them."""

    def count(latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1] // patch_size**2

    condition = sum(count(latents) for latents in batch.condition_latents or [])
    return Tokens(count(batch.target_latents), condition, batch.caption_ids.shape[1])


def training_row(
    rig: TrainingRig, task: str, resolution: int, features: str, tokens: Tokens, args: argparse.Namespace
) -> dict:
    components, device = rig.components, rig.ctx.device
    micro_batch, model_config = rig.config.batch.micro_batch_size, rig.engine.module.config
    collator = Collator(components.t5.tokenizer, components.t5.max_length)
    samples = synthetic_samples(task, micro_batch, resolution, torch.Generator().manual_seed(args.seed))
    raw = collator(samples if features == "online" else cached(samples, components, collator))
    prepare = None  # the trainer's: the frozen components online, or the cached features

    if features == "transformer":
        # One batch prepared up front, and T5's encoding of the noisy caption replaced by that of the clean one: what
        # is left is the transformer's two passes, the losses, backward and the optimizer.
        prepared = prepare_training_batch(raw, components, rig.generator, device, rig.dtype)
        caption_states = components.t5.encode_ids(raw.caption.input_ids)
        objective = rig.objective
        stubbed = UniAlignmentObjective(
            objective.config, objective.scheduler, objective.mask_token_id, lambda ids: caption_states,
            objective.null_prompt_embeds,
        )  # fmt: skip
        rig = dataclasses.replace(rig, objective=stubbed)

        def prepare(raw: RawBatch) -> TrainingBatch:
            return prepared

    measured = batch_tokens(prepare_training_batch(raw, components, None, device, rig.dtype), model_config.patch_size)
    assert measured == tokens, f"a sample of the batch has {measured} tokens; the FLOP count assumed {tokens}"

    reset_peak_memory(device)
    outcomes: list[StepResult] = []

    def step() -> None:
        outcomes.append(optimizer_step(rig, [raw] * rig.accumulation, prepare))

    seconds = timed(step, args.warmup_steps, args.steps, device)
    samples_per_s = micro_batch * rig.accumulation * len(seconds) / sum(seconds)
    flops = training_flops_per_sample(model_config, tokens.image, tokens.text, tokens.condition)
    return dict(
        task=task,
        resolution=resolution,
        features=features,
        micro_batch=micro_batch,
        accumulation=rig.accumulation,
        samples_per_s=samples_per_s,
        ms_per_step=1000 * statistics.median(seconds),
        step_seconds=seconds,
        peak_gib=peak_memory_gib(device),
        flops_per_sample=flops,
        tflops_per_s=flops * samples_per_s / 1e12,
        # Against a GPU's peak only: a CPU's share of an H100's peak says nothing.
        mfu=flops * samples_per_s / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        steps_applied=sum(outcome.applied for outcome in outcomes),
        steps_run=len(outcomes),
        loss_finite=all(math.isfinite(outcome.losses["total"]) for outcome in outcomes),
    )


def benchmark_training(
    rig: TrainingRig, token_table: dict[tuple[str, int], Tokens], args: argparse.Namespace
) -> list[dict]:
    """Rows from the cheapest to the dearest, so that running out of memory ends the table rather than spoiling it."""
    rows = []
    for resolution in args.resolutions:
        for task in args.tasks:
            for features in args.features:
                key = dict(task=task, resolution=resolution, features=features)
                try:
                    row = training_row(rig, task, resolution, features, token_table[task, resolution], args)
                except torch.cuda.OutOfMemoryError:
                    rig.engine.zero_grad()
                    row = {**key, "status": "out of memory"}
                free_memory(rig.ctx.device)
                rows.append(row)
                progress(f"train {task} {resolution} px {features}", row, "samples_per_s", "samples/s")
    return rows


def progress(what: str, row: dict, key: str, unit: str) -> None:
    """A line per finished row on stderr, so that a run cut short still shows what it measured."""
    value = row.get(key)
    shown = f"{value:.4g} {unit}" if value is not None else row.get("status", "?")
    memory = f", peak {row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else ""
    print(f"[benchmark] {what}: {shown}{memory}", file=sys.stderr, flush=True)


# --- 3. sampling ----------------------------------------------------------------------------------------------------


def build_pipeline(
    config: TrainConfig, components: FrozenComponents, device: torch.device, dtype: torch.dtype, seed: int
) -> UniAlignmentPipeline:
    """The pipeline the trainer samples with, around a fresh random transformer in the sampling dtype."""
    kwargs = transformer_kwargs(config, components.t5.vocab_size)
    build = lambda: UniAlignmentTransformer(**kwargs)  # noqa: E731
    transformer = build_with_random_weights(build, device, dtype, seed, cast_buffers=True)
    transformer.eval()
    pipeline = UniAlignmentPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=components.vae.vae,
        text_encoder=components.t5.encoder,
        tokenizer=components.t5.tokenizer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampling_row(call: Callable[[], object], batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    try:
        reset_peak_memory(device)
        seconds = timed(call, args.warmup_runs, args.repeats, device)
    except torch.cuda.OutOfMemoryError:
        free_memory(device)
        return {"batch": batch, "status": "out of memory"}
    median = statistics.median(seconds)
    return dict(
        batch=batch, seconds=median, run_seconds=seconds, per_s=batch / median, peak_gib=peak_memory_gib(device)
    )


def generate_images(pipeline: UniAlignmentPipeline, prompts: list[str], args: argparse.Namespace) -> None:
    device, size = pipeline._execution_device, args.image_resolution
    images = pipeline.text_to_image(
        prompts,
        height=size,
        width=size,
        num_inference_steps=args.t2i_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator(device).manual_seed(args.seed),
    ).images
    assert len(images) == len(prompts), f"asked for {len(prompts)} images, got {len(images)}"


def generate_captions(pipeline: UniAlignmentPipeline, images: list[PIL.Image.Image], args: argparse.Namespace) -> None:
    device, size = pipeline._execution_device, args.image_resolution
    texts = pipeline.caption(
        images,
        length=args.caption_length,
        num_inference_steps=args.caption_steps,
        height=size,
        width=size,
        # On the device: the sampler draws its Gumbel noise (batch x tokens x vocab) where the generator lives.
        generator=torch.Generator(device).manual_seed(args.seed),
    ).texts
    assert len(texts) == len(images), f"asked for {len(images)} captions, got {len(texts)}"


def benchmark_text_to_image(pipeline: UniAlignmentPipeline, args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in args.t2i_batches:
        call = functools.partial(generate_images, pipeline, caption_corpus()[:batch], args)
        row = dict(resolution=args.image_resolution, steps=args.t2i_steps, guidance_scale=args.guidance_scale)
        rows.append({**row, **sampling_row(call, batch, pipeline._execution_device, args)})
        progress(f"text-to-image batch {batch}", rows[-1], "seconds", "s")
    return rows


def benchmark_captions(pipeline: UniAlignmentPipeline, args: argparse.Namespace) -> list[dict]:
    size, rng = args.image_resolution, np.random.default_rng(args.seed)
    images = [
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        for _ in range(max(args.caption_batches))
    ]
    rows = []
    for batch in args.caption_batches:
        call = functools.partial(generate_captions, pipeline, images[:batch], args)
        row = dict(resolution=size, tokens=args.caption_length, steps=args.caption_steps)
        rows.append({**row, **sampling_row(call, batch, pipeline._execution_device, args)})
        progress(f"caption batch {batch}", rows[-1], "per_s", "captions/s")
    return rows
