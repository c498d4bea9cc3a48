"""The benchmark's workload and timing: synthetic micro-batches as the dataset yields them, the trainer's own
optimizer step timed on them (`unialignment.training.step.optimizer_step`) with each `speed` switch, and the
pipeline's text-to-image and captioning calls timed, eager and with its speed-ups, and their memory with offloading.

Every row is a dict; a row that fails (out of memory, or any error) records why and the next one runs."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import inspect
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable

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
from unialignment.training.builders import TrainingRig, build_objective, set_checkpointing
from unialignment.training.config import SpeedConfig, TrainConfig
from unialignment.training.flops import recomputed_flops_per_sample, training_flops_per_sample
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


def synthetic_samples(
    task: str, batch_size: int, resolution: int, generator: torch.Generator, uint8: bool = False
) -> list[Sample]:
    """A micro-batch as the dataset yields it: random pixels in [-1, 1] (or uint8, `speed.uint8_pixels`; no
    encoder's cost depends on what the image shows), captions of the toy corpus; an edit has one source image and an
    instruction."""
    corpus = caption_corpus()

    def pixels() -> torch.Tensor:
        if uint8:
            return torch.randint(0, 256, (3, resolution, resolution), generator=generator, dtype=torch.uint8)
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


def matmul_peak_tflops(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """TFLOP/s of a (size x size) @ (size x size) product on random data, the median of `repeats`: the reachable
    peak MFU is also reported against (an H200 reaches about 790 of its 989 data-sheet TFLOP/s in bf16)."""
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    seconds = timed(lambda: a @ b, warmup=3, repeats=repeats, device=device)
    return 2 * size**3 / statistics.median(seconds) / 1e12


class Deadline:
    """The benchmark's time budget: rows that would start after it are recorded as skipped, so that a run under a
    hard limit ends with its table (and every row done) rather than being killed mid-row."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


def guarded(key: dict, measure: Callable[[], dict], deadline: Deadline, device: torch.device) -> dict:
    """`key` merged with what `measure` returns; a row past the deadline is skipped, and one that runs out of
    memory or fails records that instead, so that the next row still runs."""
    if deadline.passed():
        return {**key, "status": "skipped: time budget"}
    try:
        return {**key, **measure()}
    except torch.cuda.OutOfMemoryError:
        return {**key, "status": "out of memory"}
    except Exception as error:  # a benchmark reports a failing row and goes on
        print(f"[benchmark] {key}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return {**key, "status": f"error: {type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    finally:
        free_memory(device)


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

# Every `speed` switch on (each off-by-default switch of SpeedConfig, so a new one joins by itself), and no
# activation checkpointing (at 512 px a micro-batch of 8 fits a 141 GB card without it).
ALL_LEVERS = {
    **{field.name: True for field in dataclasses.fields(SpeedConfig) if field.default is False},
    "gradient_checkpointing": False,
}
# Named sets of `speed` switches on top of the config's own ("plain"): each alone, then all together.
LEVERS = {
    "plain": {},
    "no checkpointing": {"gradient_checkpointing": False},
    "checkpoint every 2nd block": {"gradient_checkpointing": 2},
    "fused t2i passes": {"fuse_t2i_passes": True},
    "masked text loss": {"masked_text_loss": True},
    "prefetch": {"prefetch": True},
    "uint8 pixels": {"uint8_pixels": True},
    "teacher inputs in workers": {"teacher_inputs_in_workers": True},
    "compiled T5": {"compile_text_encoder": True},
    "compiled blocks": {"compile_blocks": True},
    "all": ALL_LEVERS,
    "all, checkpointing": {**ALL_LEVERS, "gradient_checkpointing": True},
}
COMPILING_LEVERS = frozenset(name for name, switches in LEVERS.items() if any("compile" in key for key in switches))


@dataclasses.dataclass(frozen=True)
class TrainingRow:
    task: str
    resolution: int
    features: str
    levers: str
    micro_batch: int


def training_plan(args: argparse.Namespace, micro_batch: int) -> list[TrainingRow]:
    """The training rows, most telling first (a time budget cuts the tail): at the first resolution, text-to-image
    online with the plain config, each lever alone, all of them (also at micro-batch 8); then each task and
    frozen-features mode, plain and with every lever; then the larger resolutions at micro-batch 2 with every lever
    and checkpointing."""
    first, *larger = args.resolutions
    levers = [name for name in args.levers if name in LEVERS]
    rows = [TrainingRow("t2i", first, "transformer", "plain", micro_batch)]
    rows += [TrainingRow("t2i", first, "transformer", "all", micro_batch)] if "all" in levers else []
    rows += [TrainingRow("t2i", first, "online", name, micro_batch) for name in levers]
    if "all" in levers:
        rows.append(TrainingRow("t2i", first, "online", "all", max(8, micro_batch)))
    for task in args.tasks:
        for features in args.features:
            for name in ("plain", "all"):
                if name == "plain" or name in levers:
                    rows.append(TrainingRow(task, first, features, name, micro_batch))
    for resolution in larger:
        for task in args.tasks:
            for features in args.features:
                name = "all, checkpointing" if "all" in levers else "plain"
                rows.append(TrainingRow(task, resolution, features, name, 2))
    unique = []
    for row in rows:
        if row not in unique and row.task in args.tasks and row.features in args.features:
            unique.append(row)
    return unique


def with_levers(rig: TrainingRig, plain: SpeedConfig, name: str) -> TrainingRig:
    """The rig with the `speed` switches of LEVERS[name] on top of `plain`: checkpointing and compilation set on the
    built models, the objective rebuilt with its switches, the config (which the step and the batch read) replaced."""
    speed = dataclasses.replace(plain, **LEVERS[name])
    model = rig.engine.module
    set_checkpointing(model, speed.gradient_checkpointing)
    set_compiled(model.transformer_blocks, speed.compile_blocks)
    set_compiled([rig.components.t5.encoder], speed.compile_text_encoder)
    config = dataclasses.replace(rig.config, speed=speed)
    return dataclasses.replace(rig, config=config, objective=build_objective(config, rig.components))


def set_compiled(modules: Iterable[torch.nn.Module], compiled: bool) -> None:
    """`torch.compile` each module in place, or undo it (compiled code stays cached, so a module compiled again
    reuses it)."""
    for module in modules:
        if compiled and module._compiled_call_impl is None:
            module.compile()
        elif not compiled:
            module._compiled_call_impl = None


def batch_tokens(batch: TrainingBatch, patch_size: int) -> Tokens:
    """Token counts of a prepared batch, as `batch_flops` reads them."""

    def count(latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1] // patch_size**2

    condition = sum(count(latents) for latents in batch.condition_latents or [])
    return Tokens(count(batch.target_latents), condition, batch.caption_ids.shape[1])


def training_row(rig: TrainingRig, row: TrainingRow, tokens: Tokens, args: argparse.Namespace) -> dict:
    """Time the trainer's optimizer step on one synthetic micro-batch (repeated for every micro-step)."""
    components, device, speed = rig.components, rig.ctx.device, rig.config.speed
    model_config = rig.engine.module.config
    tokenizer, length = components.t5.tokenizer, components.t5.max_length
    samples = synthetic_samples(
        row.task, row.micro_batch, row.resolution, torch.Generator().manual_seed(args.seed), speed.uint8_pixels
    )
    teacher = components.teacher
    preparer = teacher.input_preparer() if teacher is not None and speed.teacher_inputs_in_workers else None
    collator = Collator(tokenizer, length, preparer)
    raw = collator(samples if row.features == "online" else cached(samples, components, Collator(tokenizer, length)))
    if speed.prefetch and device.type == "cuda":
        raw = raw.pin_memory()  # what the DataLoader's pinning thread hands over
    prepare = None  # the trainer's: the frozen components online, or the cached features

    if row.features == "transformer":
        # One batch prepared up front, and T5's encoding of the noisy caption replaced by that of the clean one: what
        # is left is the transformer's two passes, the losses, backward and the optimizer.
        def draw(latent_shape, caption):
            return rig.objective.draw(latent_shape, caption.input_ids, caption.score_mask, caption.attention_mask)

        prepared = prepare_training_batch(
            raw, components, rig.generator, device, rig.dtype, draw if speed.prefetch else None
        )
        caption_states = components.t5.encode_ids(raw.caption.input_ids)
        stubbed = copy.copy(rig.objective)
        stubbed.encode_text_ids = lambda ids: caption_states
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
    samples_per_s = row.micro_batch * rig.accumulation * len(seconds) / sum(seconds)
    flops = training_flops_per_sample(model_config, tokens.image, tokens.text, tokens.condition)
    every = int(speed.gradient_checkpointing)
    hardware_flops = flops + recomputed_flops_per_sample(
        model_config, tokens.image, tokens.text, tokens.condition, every
    )
    return dict(
        accumulation=rig.accumulation,
        samples_per_s=samples_per_s,
        ms_per_step=1000 * statistics.median(seconds),
        step_seconds=seconds,
        peak_gib=peak_memory_gib(device),
        flops_per_sample=flops,
        hardware_flops_per_sample=hardware_flops,
        tflops_per_s=flops * samples_per_s / 1e12,
        mfu=flops * samples_per_s / (args.matmul_tflops * 1e12),
        mfu_datasheet=flops * samples_per_s / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        hfu=hardware_flops * samples_per_s / (args.matmul_tflops * 1e12),
        steps_applied=sum(outcome.applied for outcome in outcomes),
        steps_run=len(outcomes),
        loss_finite=all(math.isfinite(outcome.losses["total"]) for outcome in outcomes),
    )


def benchmark_training(
    rig: TrainingRig,
    plan: list[TrainingRow],
    token_table: dict[tuple[str, int], Tokens],
    args: argparse.Namespace,
    deadline: Deadline,
    emit: Callable[[str, dict], None],
) -> list[dict]:
    plain = rig.config.speed
    rows = []
    for planned in plan:

        def measure(planned: TrainingRow = planned) -> dict:
            configured = with_levers(rig, plain, planned.levers)
            return training_row(configured, planned, token_table[planned.task, planned.resolution], args)

        row = guarded(dataclasses.asdict(planned), measure, deadline, rig.ctx.device)
        if "status" in row:
            rig.engine.zero_grad()
        rows.append(row)
        emit("train", row)
        progress(f"train {planned.task} {planned.resolution} px {planned.features} [{planned.levers}]", row,
                 "samples_per_s", "samples/s")  # fmt: skip
    with_levers(rig, plain, "plain")
    return rows


def progress(what: str, row: dict, key: str, unit: str) -> None:
    """A line per finished row on stderr, so that a run cut short still shows what it measured."""
    value = row.get(key)
    shown = f"{value:.4g} {unit}" if value is not None else row.get("status", "?")
    memory = f", peak {row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else ""
    print(f"[benchmark] {what}: {shown}{memory}", file=sys.stderr, flush=True)


# --- 2. sampling ----------------------------------------------------------------------------------------------------

SAMPLING_MODES = {
    "eager": "eager blocks",
    "fast": "compiled blocks, channels-last VAE",
    "fast + CUDA graphs": "compiled blocks with CUDA graphs, channels-last VAE",
}
PLACEMENTS = {
    "full": "every model on the GPU",
    "T5 offloaded": "model CPU offload: each model on the GPU only while it runs",
    "sequential offload": "sequential CPU offload: weights streamed to the GPU layer by layer",
}


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


def sampling_measure(call: Callable[[], object], batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    reset_peak_memory(device)
    seconds = timed(call, args.warmup_runs, args.repeats, device)
    median = statistics.median(seconds)
    return dict(seconds=median, run_seconds=seconds, per_s=batch / median, peak_gib=peak_memory_gib(device))


def generate_images(
    pipeline: UniAlignmentPipeline, prompts: list[str], resolution: int, steps: int, args: argparse.Namespace
) -> None:
    device = pipeline._execution_device
    images = pipeline.text_to_image(
        prompts,
        height=resolution,
        width=resolution,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator(device).manual_seed(args.seed),
    ).images
    assert len(images) == len(prompts), f"asked for {len(prompts)} images, got {len(images)}"


def generate_captions(
    pipeline: UniAlignmentPipeline, images: list[PIL.Image.Image], steps: int, args: argparse.Namespace
) -> None:
    device, size = pipeline._execution_device, images[0].width
    texts = pipeline.caption(
        images,
        length=args.caption_length,
        num_inference_steps=steps,
        height=size,
        width=size,
        # On the device: the sampler's random numbers are drawn where the generator lives.
        generator=torch.Generator(device).manual_seed(args.seed),
    ).texts
    assert len(texts) == len(images), f"asked for {len(images)} captions, got {len(texts)}"


def random_images(count: int, size: int, seed: int) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def benchmark_sampling(
    pipeline: UniAlignmentPipeline, args: argparse.Namespace, deadline: Deadline, emit: Callable[[str, dict], None]
) -> dict[str, list[dict]]:
    """Text-to-image and captioning rows, eager first, then with `enable_fast_sampling` (and CUDA graphs on a GPU),
    then peak memory with the models offloaded."""
    device = pipeline._execution_device
    first, *larger = args.image_resolutions
    found: dict[str, list[dict]] = {"text_to_image": [], "caption": [], "memory": []}

    def run(section: str, key: dict, call: Callable[[], object], batch: int, what: str) -> None:
        row = guarded(key, lambda: sampling_measure(call, batch, device, args), deadline, device)
        found[section].append(row)
        emit(section, row)
        progress(what, row, "seconds", "s")

    def images_row(mode: str, resolution: int, steps: int, batch: int = 1) -> None:
        key = dict(mode=mode, resolution=resolution, steps=steps, guidance_scale=args.guidance_scale, batch=batch)
        call = functools.partial(generate_images, pipeline, caption_corpus()[:batch], resolution, steps, args)
        run("text_to_image", key, call, batch, f"text-to-image {resolution} px {steps} steps batch {batch} [{mode}]")

    def captions_row(mode: str, resolution: int, batch: int) -> None:
        key = dict(mode=mode, resolution=resolution, tokens=args.caption_length, steps=args.caption_steps, batch=batch)
        images = random_images(batch, resolution, args.seed)
        call = functools.partial(generate_captions, pipeline, images, args.caption_steps, args)
        run("caption", key, call, batch, f"caption {resolution} px batch {batch} [{mode}]")

    images_row("eager", first, args.t2i_steps)
    captions_row("eager", first, 1)
    if args.fast_sampling:
        pipeline.enable_fast_sampling(compile_blocks=True, cuda_graphs=False, channels_last_vae=True)
        images_row("fast", first, args.t2i_steps)
        for batch in args.caption_batches:
            captions_row("fast", first, batch)
        for resolution in larger:
            images_row("fast", resolution, args.t2i_steps)
        images_row("fast", first, args.semgen_steps)
        if device.type == "cuda":
            pipeline.enable_fast_sampling(compile_blocks=True, cuda_graphs=True, channels_last_vae=True)
            images_row("fast + CUDA graphs", first, args.t2i_steps)
            captions_row("fast + CUDA graphs", first, 1)
    benchmark_memory(pipeline, args, deadline, found, emit)
    return found


def benchmark_memory(
    pipeline: UniAlignmentPipeline,
    args: argparse.Namespace,
    deadline: Deadline,
    found: dict[str, list[dict]],
    emit: Callable[[str, dict], None],
) -> None:
    """Peak memory of text-to-image (batch 1, guidance) and captioning (batch 1) at each resolution, with every model
    on the GPU, with model CPU offload and with sequential CPU offload (two steps each: the peak does not depend on
    the number of steps)."""
    device = pipeline._execution_device
    steps = 2
    for placement in PLACEMENTS:
        if placement != "full" and device.type != "cuda":
            for resolution in args.image_resolutions:
                for task in ("text-to-image", "caption"):
                    row = dict(task=task, resolution=resolution, placement=placement, status="needs a GPU")
                    found["memory"].append(row)
                    emit("memory", row)
            continue
        if placement == "T5 offloaded":
            pipeline.enable_model_cpu_offload(device=device)
        elif placement == "sequential offload":
            pipeline.remove_all_hooks()
            pipeline.enable_sequential_cpu_offload(device=device)
        for resolution in args.image_resolutions:
            prompt, image = caption_corpus()[:1], random_images(1, resolution, 0)
            calls = {
                "text-to-image": functools.partial(generate_images, pipeline, prompt, resolution, steps, args),
                "caption": functools.partial(generate_captions, pipeline, image, steps, args),
            }
            for task, call in calls.items():
                key = dict(task=task, resolution=resolution, placement=placement)

                def measure(call: Callable[[], object] = call) -> dict:
                    reset_peak_memory(device)
                    call()
                    synchronize(device)
                    return dict(peak_gib=peak_memory_gib(device))

                row = guarded(key, measure, deadline, device)
                found["memory"].append(row)
                emit("memory", row)
                progress(f"memory {task} {resolution} px [{placement}]", row, "peak_gib", "GiB")
