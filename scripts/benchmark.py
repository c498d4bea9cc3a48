"""Speed and memory of UniAlignment with random weights (issue #8): tables to paste into BENCHMARKS.md.

Builds the whole system from configs, every weight drawn at random on the device, no checkpoint read: the
transformer at the authors' SD3-medium config through the trainer's own `build_transformer`, T5-XXL's encoder,
SD3's VAE and the Qwen2.5-VL-7B teacher (the vision tower and input embeddings that `QwenVLTeacher` keeps). Then:

1. training: the trainer's optimizer step (`prepare_training_batch`, `UniAlignmentObjective`, DeepSpeed backward
   and step, the EMA update) on text-to-image and edit micro-batches, with the frozen components run online
   ("online"), with their outputs read from the offline feature cache ("cache"; T5 still encodes the noisy caption,
   which changes every step), and on a prepared batch with T5 stubbed out ("transformer");
2. model FLOPs per training sample (unialignment/training/flops.py; the formula is printed) and MFU;
3. sampling through `UniAlignmentPipeline`: text-to-image latency and caption latency and throughput.

    python scripts/benchmark.py                                   # full size, one CUDA GPU
    python scripts/benchmark.py --sections train --json runs/benchmark_train.json
    python scripts/benchmark.py --tiny                            # toy components, CPU, seconds: the CI smoke run

Warm-up steps and runs are not timed; the device is synchronised around every timing; peak memory is
`torch.cuda.max_memory_allocated` since the row started, with every resident model counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import deepspeed
import diffusers
import numpy as np
import PIL.Image
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLModel,
    Qwen2VLImageProcessorPil,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from unialignment.data.collate import Collator
from unialignment.data.dataset import Sample
from unialignment.data.feature_cache import write_feature_cache
from unialignment.data.features import FrozenComponents, compute_features, prepare_training_batch
from unialignment.data.records import TaskKind
from unialignment.frozen.teacher import QwenVLTeacher
from unialignment.frozen.text_encoder import FrozenT5, load_t5_tokenizer
from unialignment.frozen.vae import FrozenVAE
from unialignment.models import UniAlignmentTransformer
from unialignment.pipelines import UniAlignmentPipeline
from unialignment.toy.components import TinyComponentFolders, make_tiny_components
from unialignment.toy.t5 import caption_corpus
from unialignment.toy.teacher import make_tiny_tokenizer
from unialignment.training.config import TrainConfig, load_config
from unialignment.training.distributed import DistributedContext, init_distributed
from unialignment.training.ema import ShardedEMA
from unialignment.training.flops import training_flops_per_sample, transformer_flops, transformer_flops_terms
from unialignment.training.objective import TrainingBatch, UniAlignmentObjective
from unialignment.training.trainer import DTYPES, build_transformer, deepspeed_config, learning_rate_lambda

REPO = Path(__file__).resolve().parents[1]

# The frozen components at full size, as in ../shared/reference/full_size_components.json (tests/test_benchmark.py
# checks them against that file where it exists).
T5_XXL_ENCODER = dict(
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
)
T5_TOKENIZER_LENGTH = 32100  # len(SD3's tokenizer_3): the size of the transformer's text head
SD3_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
QWEN2_5_VL_7B_TEXT = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
)
QWEN2_5_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    num_heads=16,
    intermediate_size=3420,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    out_hidden_size=3584,
)
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json: the pixel budget that decides how many vision tokens an image is.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056
# Scales of the random weights: matrices N(0, 0.02^2) as transformers initialises them, norm scales 1, biases 0.
WEIGHT_STD = 0.02

FEATURE_MODES = {
    "online": "T5, VAE and teacher every step",
    "cache": "feature cache, T5 on the noisy caption only",
    "transformer": "none (transformer only)",
}
# Defaults that differ between the full size and --tiny (configs/debug.py, the tiny transformer the debug run trains,
# with the toy T5, VAE and teacher), which has to stay quick enough for CI.
MODES = {
    "full": dict(
        config="configs/stage1_t2i_caption.py",
        resolutions=[512, 1024],
        image_resolution=512,
        warmup_steps=2,
        steps=5,
        caption_batches=[1, 16, 32],
        repeats=3,
    ),
    "tiny": dict(
        config="configs/debug.py",
        resolutions=[32, 64],
        image_resolution=64,
        warmup_steps=1,
        steps=2,
        caption_batches=[1, 16],
        repeats=2,
    ),
}
GiB = 2**30


# --- the components, random weights from configs -------------------------------------------------------------------


def synthetic_t5_tokenizer(length: int, corpus: list[str]) -> T5Tokenizer:
    """A T5 tokenizer of exactly `length` tokens (SD3's has 32100), laid out as T5's: `<pad>`, `</s>`, `<unk>`,
    pieces, then the 100 sentinels `<extra_id_99>` ... `<extra_id_0>` last. The pieces are the words and characters
    of `corpus` (so its captions tokenize without `<unk>`) and fillers up to `length`: the ids mean nothing, what the
    speed depends on is the size of the text head and of T5's embedding."""
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    words = sorted({word for text in corpus for word in text.split()})
    characters = sorted({character for word in words for character in word})
    pieces = [(f"▁{word}", -5.0) for word in words] + [("▁", -8.0)] + [(c, -10.0) for c in characters]
    fillers = length - 3 - len(pieces) - len(sentinels)
    if fillers < 0:
        raise ValueError(f"a {length}-token tokenizer cannot hold the {len(pieces)} pieces of the corpus")
    pieces += [(f"▁filler{i}", -20.0) for i in range(fillers)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, *sentinels]
    return T5Tokenizer(vocab=vocab, extra_ids=len(sentinels))


def write_full_size_folders(folder: Path) -> TinyComponentFolders:
    """Folders of the full-size frozen components holding configs, tokenizers and the image processor but no
    weights, in the layout `make_tiny_components` writes, so that one loader builds either size."""
    folders = TinyComponentFolders(folder / "tokenizer", folder / "text_encoder", folder / "vae", folder / "teacher")
    synthetic_t5_tokenizer(T5_TOKENIZER_LENGTH, caption_corpus()).save_pretrained(folders.tokenizer)
    T5Config(**T5_XXL_ENCODER).save_pretrained(folders.text_encoder)
    folders.vae.mkdir(parents=True)
    (folders.vae / "config.json").write_text(json.dumps({"_class_name": AutoencoderKL.__name__, **SD3_VAE}))
    # Multimodal RoPE splits the 128-wide heads' 64 frequencies over (time, height, width), as Qwen2.5-VL-7B does.
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    Qwen2_5_VLConfig(
        text_config=dict(QWEN2_5_VL_7B_TEXT, rope_parameters=rope), vision_config=QWEN2_5_VL_7B_VISION
    ).save_pretrained(folders.teacher)
    # The toy's Qwen2 tokenizer: a text target is an embedding lookup, whose cost does not depend on the ids.
    make_tiny_tokenizer().save_pretrained(folders.teacher)
    # Saved with the PIL backend; AutoImageProcessor then picks the backend the trainer would (torchvision if present).
    Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=QWEN2_5_VL_7B_VISION["patch_size"],
        merge_size=QWEN2_5_VL_7B_VISION["spatial_merge_size"],
        temporal_patch_size=QWEN2_5_VL_7B_VISION["temporal_patch_size"],
    ).save_pretrained(folders.teacher)
    return folders


def random_weights(
    build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype, seed: int, cast_buffers: bool = False
) -> nn.Module:
    """`build()` with its parameters on the meta device, then each parameter drawn on `device` in `dtype`: a 4.7 B
    T5 and a 1.2 B teacher cost no CPU initialisation and no float32 copy. Buffers (rotary frequencies, the position
    table) are computed at construction as usual and moved, and with `cast_buffers` cast to `dtype`, as diffusers'
    `from_pretrained(torch_dtype=...)` does (transformers keeps them in float32). Tied parameters stay tied."""
    with init_empty_weights(include_buffers=False):
        module = build()
    if isinstance(module, transformers.PreTrainedModel):
        module.tie_weights()  # accelerate's meta initialisation unties them (T5's shared embedding); free on meta
    generator = torch.Generator(device).manual_seed(seed)
    drawn: dict[int, nn.Parameter] = {}
    for submodule in module.modules():
        for name, param in list(submodule.named_parameters(recurse=False)):
            if id(param) not in drawn:
                value = torch.empty(param.shape, device=device, dtype=dtype)
                if param.ndim >= 2:
                    value.normal_(0.0, WEIGHT_STD, generator=generator)
                else:  # biases 0, norm scales 1
                    value.fill_(0.0 if name.endswith("bias") else 1.0)
                drawn[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            setattr(submodule, name, drawn[id(param)])
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            cast = cast_buffers and buffer.is_floating_point()
            setattr(submodule, name, buffer.to(device, dtype if cast else buffer.dtype))
    return module


def build_frozen_components(
    folders: TinyComponentFolders, config: TrainConfig, device: torch.device, seed: int
) -> FrozenComponents:
    """What `trainer.load_components` loads, built from the folders' configs with random weights instead."""
    settings, dtype = config.components, DTYPES[config.components.dtype]
    t5_config = AutoConfig.from_pretrained(folders.text_encoder)
    encoder = random_weights(lambda: T5EncoderModel._from_config(t5_config), device, dtype, seed)
    t5 = FrozenT5(load_t5_tokenizer(folders.tokenizer), encoder, settings.text_length)
    vae_config = AutoencoderKL.load_config(folders.vae)
    vae = FrozenVAE(random_weights(lambda: AutoencoderKL.from_config(vae_config), device, dtype, seed + 1, True))
    # As QwenVLTeacher.from_pretrained keeps it: the vision tower and the LLM's input embeddings, no decoder layers.
    teacher_config = AutoConfig.from_pretrained(folders.teacher)
    teacher_config.text_config.num_hidden_layers = 0
    teacher_config.text_config.layer_types = []
    teacher = QwenVLTeacher(
        random_weights(lambda: Qwen2_5_VLModel._from_config(teacher_config), device, dtype, seed + 2),
        AutoTokenizer.from_pretrained(folders.teacher),
        AutoImageProcessor.from_pretrained(folders.teacher),
        average_padding=settings.teacher_average_padding,
        max_text_length=settings.text_length,
    )
    return FrozenComponents(t5, vae, teacher)


def transformer_kwargs(config: TrainConfig, vocab_size: int) -> dict:
    """The arguments `build_transformer` gives a fresh transformer."""
    return {"vocab_size": vocab_size, **config.model.config}


def parameter_count(module: nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


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


@dataclasses.dataclass
class TrainingRig:
    """What `Trainer.__init__` builds around the transformer, built with the trainer's own helpers."""

    config: TrainConfig
    components: FrozenComponents
    engine: deepspeed.DeepSpeedEngine
    ema: ShardedEMA | None
    objective: UniAlignmentObjective
    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype
    accumulation: int


def build_training(config: TrainConfig, components: FrozenComponents, ctx: DistributedContext) -> TrainingRig:
    """As `Trainer.__init__` does, without the data folders, run folder and checkpoints."""
    torch.manual_seed(config.seed + ctx.rank)
    generator = torch.Generator().manual_seed(config.seed * 1000 + ctx.rank)
    # Built on the device: 2.1 B parameters initialise there in a moment, on the CPU in tens of seconds.
    with torch.device(ctx.device):
        model, _ = build_transformer(config, components.t5.vocab_size)
    trainable = [param for param in model.parameters() if param.requires_grad]
    accumulation = config.batch.gradient_accumulation_steps(ctx.world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=deepspeed_config(config, accumulation, ctx.world_size, ctx.device.type == "cuda"),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config)),
    )
    ema = ShardedEMA(engine.module, config.ema_decay, ctx.rank, ctx.world_size) if config.ema_decay > 0 else None
    t5 = components.t5
    objective = UniAlignmentObjective(
        config.objective, FlowMatchEulerDiscreteScheduler(), t5.mask_token_id, t5.encode_ids, t5.null_prompt_embeds()
    )
    engine.train()
    dtype = torch.bfloat16 if config.deepspeed.precision == "bf16" else torch.float32
    return TrainingRig(config, components, engine, ema, objective, generator, ctx.device, dtype, accumulation)


def optimizer_step(
    rig: TrainingRig, next_batch: Callable[[], TrainingBatch], objective: UniAlignmentObjective
) -> tuple[bool, float]:
    """One optimizer step as `Trainer.train` runs it: per micro-step the batch, the objective, DeepSpeed's backward
    and step, the loss terms read for logging (a host sync, as in training); then the EMA update."""
    engine = rig.engine
    for _ in range(rig.accumulation):
        losses = objective(engine, next_batch(), rig.generator)
        engine.backward(losses.total)
        engine.step()
        total = losses.scalars()["total"]
    applied = engine.was_step_applied()
    if applied and rig.ema is not None:
        rig.ema.update()
    return applied, total


def batch_tokens(batch: TrainingBatch, patch_size: int) -> Tokens:
    """Token counts of a prepared batch, as `Trainer._flops_per_sample` reads them."""

    def count(latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1] // patch_size**2

    condition = sum(count(latents) for latents in batch.condition_latents or [])
    return Tokens(count(batch.target_latents), condition, batch.caption_ids.shape[1])


def training_row(
    rig: TrainingRig, task: str, resolution: int, features: str, tokens: Tokens, args: argparse.Namespace
) -> dict:
    components, device = rig.components, rig.device
    micro_batch, model_config = rig.config.batch.micro_batch_size, rig.engine.module.config
    collator = Collator(components.t5.tokenizer, components.t5.max_length)
    samples = synthetic_samples(task, micro_batch, resolution, torch.Generator().manual_seed(args.seed))
    raw = collator(samples if features == "online" else cached(samples, components, collator))
    objective = rig.objective

    def next_batch() -> TrainingBatch:  # the trainer's line: the frozen components online, or the cached features
        return prepare_training_batch(raw, components, rig.generator, device, rig.dtype)

    if features == "transformer":
        # One batch prepared up front, and T5's encoding of the noisy caption replaced by that of the clean one: what
        # is left is the transformer's two passes, the losses, backward and the optimizer.
        prepared = next_batch()
        caption_states = components.t5.encode_ids(raw.caption.input_ids)
        objective = UniAlignmentObjective(
            rig.config.objective,
            rig.objective.scheduler,
            rig.objective.mask_token_id,
            lambda noisy_ids: caption_states,
            rig.objective.null_prompt_embeds,
        )

        def next_batch() -> TrainingBatch:
            return prepared

    measured = batch_tokens(next_batch(), model_config.patch_size)
    assert measured == tokens, f"a sample of the batch has {measured} tokens; the FLOP count assumed {tokens}"

    reset_peak_memory(device)
    outcomes = []
    seconds = timed(
        lambda: outcomes.append(optimizer_step(rig, next_batch, objective)), args.warmup_steps, args.steps, device
    )
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
        steps_applied=sum(applied for applied, _ in outcomes),
        steps_run=len(outcomes),
        loss_finite=all(math.isfinite(loss) for _, loss in outcomes),
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
                free_memory(rig.device)
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
    transformer = random_weights(lambda: UniAlignmentTransformer(**kwargs), device, dtype, seed, cast_buffers=True)
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


# --- the report -----------------------------------------------------------------------------------------------------


def number(value: float | None, digits: int = 3) -> str:
    """Significant digits, thousands separated; "—" for what was not measured."""
    if value is None:
        return "—"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def flops_rows(model_config, token_table: dict[tuple[str, int], Tokens]) -> list[dict]:
    rows = []
    for (task, resolution), tokens in token_table.items():
        image_pass = transformer_flops(
            model_config, tokens.image, tokens.text, text_head=False, image_head=True, condition_tokens=tokens.condition
        )
        text_pass = transformer_flops(model_config, tokens.image, tokens.text, text_head=True, image_head=False)
        rows.append(
            dict(
                task=task,
                resolution=resolution,
                image_tokens=tokens.image,
                condition_tokens=tokens.condition,
                text_tokens=tokens.text,
                image_pass_flops=image_pass,
                text_pass_flops=text_pass,
                training_flops_per_sample=training_flops_per_sample(
                    model_config, tokens.image, tokens.text, tokens.condition
                ),
            )
        )
    return rows


def flops_section(model_config, rows: list[dict], peak_tflops: float) -> list[str]:
    terms = transformer_flops_terms(model_config, 1, 1, text_head=True, image_head=True)
    hidden = model_config.num_attention_heads * model_config.attention_head_dim
    symbols = (
        f"D = {hidden}, num_layers = {model_config.num_layers}, p = {model_config.patch_size}, "
        f"C_in = {model_config.in_channels}, C_out = {model_config.out_channels}, "
        f"joint_attention_dim = {model_config.joint_attention_dim}, vocab = {model_config.vocab_size}"
    )
    lines = [
        "### Model FLOPs (unialignment/training/flops.py)",
        "",
        "Training FLOPs per sample = 3 x (image-stream pass + text-stream pass), backward counted as twice the "
        "forward and a multiply-add as 2 FLOPs. One pass of one sample:",
        "",
        "    " + " + ".join(terms),
        "",
        "with T = N_img + N_cond + N_txt in the image-stream pass and N_img + N_txt in the text-stream pass (which "
        "has no condition images); the image head (2 D p^2 C_out N_img) runs in the image-stream pass only, the "
        f"text head (2 D vocab N_txt) in the text-stream pass only. Here {symbols}. Norms, activations, softmax, "
        "adaLN modulation and the alignment heads are left out (small). MFU = training FLOPs per sample x samples/s "
        f"/ peak, peak = {peak_tflops:g} TFLOP/s (--peak-tflops).",
        "",
        "| task | px | N_img | N_cond | N_txt | image-stream pass | text-stream pass | training FLOPs / sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['resolution']} | {row['image_tokens']} | {row['condition_tokens']} | "
            f"{row['text_tokens']} | {row['image_pass_flops']:,} | {row['text_pass_flops']:,} | "
            f"{row['training_flops_per_sample']:,} |"
        )
    return lines


def training_section(rows: list[dict]) -> list[str]:
    legend = "; ".join(f"{name}: {meaning}" for name, meaning in FEATURE_MODES.items())
    lines = [
        "### Training: samples/s per GPU and peak memory",
        "",
        f"Frozen features: {legend}.",
        "",
        "| task | px | frozen features | samples/s | ms / step (median) | peak GiB | model TFLOP/s | MFU | steps "
        "applied |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        key = f"| {row['task']} | {row['resolution']} | {row['features']} |"
        if "status" in row:
            lines.append(f"{key} {row['status']} | — | — | — | — | — |")
            continue
        mfu = "—" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        applied = f"{row['steps_applied']}/{row['steps_run']}" + ("" if row["loss_finite"] else ", loss not finite")
        lines.append(
            f"{key} {number(row['samples_per_s'])} | {number(row['ms_per_step'])} | {number(row['peak_gib'])} | "
            f"{number(row['tflops_per_s'])} | {mfu} | {applied} |"
        )
    return lines


def sampling_section(title: str, rows: list[dict], columns: list[tuple[str, str]], rate: str) -> list[str]:
    names = [name for name, _ in columns]
    lines = [
        title,
        "",
        f"| {' | '.join(names)} | batch | s / call (median) | {rate} | peak GiB |",
        "| " + " | ".join(["---:"] * (len(names) + 4)) + " |",
    ]
    for row in rows:
        cells = [str(row[key]) for _, key in columns] + [str(row["batch"])]
        if "status" in row:
            cells += [row["status"], "—", "—"]
        else:
            cells += [number(row["seconds"]), number(row["per_s"]), number(row["peak_gib"])]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def goals(results: dict) -> list[dict]:
    """The issue's goals for one H100, each against the row that measures it, when that row was run."""

    def training(task: str, features: str) -> dict | None:
        rows = [
            r
            for r in results.get("training", [])
            if (r["task"], r["resolution"], r["features"]) == (task, 512, features)
        ]
        return rows[0] if rows and "status" not in rows[0] else None

    found = []
    row = training("t2i", "transformer")
    found.append(
        dict(
            goal="transformer training, text-to-image 512 px",
            # 33 x 12.0 TFLOP = 396 TFLOP/s: the 50% is of the ~800 TFLOP/s an H100 reaches on a large bf16
            # matrix product (reference_speed_h100.json), 40% of the 989 TFLOP/s data-sheet peak.
            target=">= 33 samples/s (issue: >= 50% MFU of ~800 TFLOP/s reachable)",
            measured=None
            if row is None
            else f"{row['samples_per_s']:.1f} samples/s, {row['tflops_per_s']:.0f} TFLOP/s",
            met=None if row is None else row["samples_per_s"] >= 33,
        )
    )
    for features, target in (("cache", 25), ("online", 15)):
        row = training("t2i", features)
        found.append(
            dict(
                goal=f"end-to-end training step, text-to-image 512 px, {FEATURE_MODES[features]}",
                target=f">= {target} samples/s",
                measured=None if row is None else f"{row['samples_per_s']:.1f} samples/s",
                met=None if row is None else row["samples_per_s"] >= target,
            )
        )
    images = [
        r
        for r in results.get("text_to_image", [])
        if (r["resolution"], r["steps"], r["batch"]) == (512, 28, 1) and r["guidance_scale"] > 1 and "status" not in r
    ]
    found.append(
        dict(
            goal="text-to-image 512 px, 28 steps, CFG, batch 1",
            target="<= 0.35 s",
            measured=f"{images[0]['seconds']:.3f} s" if images else None,
            met=images[0]["seconds"] <= 0.35 if images else None,
        )
    )
    captions = [r for r in results.get("caption", []) if (r["tokens"], r["steps"]) == (256, 64) and "status" not in r]
    best = max(captions, key=lambda r: r["per_s"]) if captions else None
    found.append(
        dict(
            goal="captioning, 256 tokens, 64 steps (best batch)",
            target=">= 4.5 captions/s",
            measured=None if best is None else f"{best['per_s']:.2f} captions/s at batch {best['batch']}",
            met=None if best is None else best["per_s"] >= 4.5,
        )
    )
    return found


def goals_section(rows: list[dict]) -> list[str]:
    lines = ["### Goals (issue #8, one H100)", "", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    for row in rows:
        met = "not measured" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['goal']} | {row['target']} | {row['measured'] or '—'} | {met} |")
    return lines


def count(parameters: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.3f} {unit}"
    return str(parameters)


def header_section(results: dict) -> list[str]:
    header, setup = results["header"], results["setup"]
    title = (
        "tiny toy components: a smoke check of the script on this device, not a speed result"
        if header["tiny"]
        else "full size, random weights"
    )
    versions = ", ".join(
        f"{name} {header[name]}" for name in ("python", "torch", "diffusers", "transformers", "deepspeed")
    )
    sizes = setup["parameters"]
    lines = [
        f"## UniAlignment benchmark: {title}",
        "",
        f"- date: {header['date']}; device: {header['device']}",
        f"- software: {versions}",
        f"- command: `{header['command']}`",
        f"- weights: random. Transformer {count(sizes['transformer'])} parameters ({setup['transformer']}); "
        f"frozen in {setup['components_dtype']}: T5 encoder {count(sizes['t5'])}, VAE {count(sizes['vae'])}, "
        f"teacher {count(sizes['teacher'])} (vision tower and input embeddings)",
    ]
    if "training" in setup:
        lines.append(f"- training: {setup['training']}")
    if "sampling" in setup:
        lines.append(f"- sampling: {setup['sampling']}")
    return lines


def markdown(results: dict) -> str:
    sections = [
        header_section(results),
        flops_section(results["model_config"], results["flops"], results["peak_tflops"]),
    ]
    if "training" in results:
        sections.append(training_section(results["training"]))
    if "text_to_image" in results:
        columns = [("px", "resolution"), ("steps", "steps"), ("guidance", "guidance_scale")]
        title = "### Text-to-image through UniAlignmentPipeline (T5, CFG denoising, VAE decode)"
        sections.append(sampling_section(title, results["text_to_image"], columns, "images/s"))
    if "caption" in results:
        columns = [("px", "resolution"), ("tokens", "tokens"), ("steps", "steps")]
        title = "### Captioning through UniAlignmentPipeline (VAE encode, T5 + transformer per changed step)"
        sections.append(sampling_section(title, results["caption"], columns, "captions/s"))
    if "goals" in results:
        sections.append(goals_section(results["goals"]))
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


# --- the command line -----------------------------------------------------------------------------------------------


def comma_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item]

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the toy components at a tiny size: the CI smoke run")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full size without a GPU anyway (very slow)")
    parser.add_argument("--config", help="training config (default configs/stage1_t2i_caption.py; --tiny: debug.py)")
    parser.add_argument("--sections", type=comma_list(str), default=["train", "t2i", "caption"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0)
    training = parser.add_argument_group("training (section train)")
    training.add_argument("--tasks", type=comma_list(str), default=["t2i", "edit"])
    training.add_argument("--resolutions", type=comma_list(int), help="default 512,1024 (--tiny: 32,64)")
    training.add_argument(
        "--features", type=comma_list(str), default=list(FEATURE_MODES), help="of " + ", ".join(FEATURE_MODES)
    )
    training.add_argument("--micro-batch", type=int, help="default: the config's batch.micro_batch_size")
    training.add_argument("--accumulation", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    training.add_argument("--gradient-checkpointing", choices=["config", "on", "off"], default="config")
    training.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="default: the config's")
    training.add_argument("--warmup-steps", type=int, help="untimed optimizer steps per row (default 2; --tiny: 1)")
    training.add_argument("--steps", type=int, help="timed optimizer steps per row (default 5; --tiny: 2)")
    training.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    sampling = parser.add_argument_group("sampling (sections t2i and caption)")
    sampling.add_argument(
        "--image-resolution", type=int, help="generated and captioned images (default 512; --tiny: 64)"
    )
    sampling.add_argument("--t2i-steps", type=int, default=28)
    sampling.add_argument("--guidance-scale", type=float, default=7.0)
    sampling.add_argument("--t2i-batches", type=comma_list(int), default=[1])
    sampling.add_argument("--caption-length", type=int, help="tokens per caption (default: the config's text length)")
    sampling.add_argument("--caption-steps", type=int, default=64)
    sampling.add_argument("--caption-batches", type=comma_list(int), help="default 1,16,32 (--tiny: 1,16)")
    sampling.add_argument("--inference-dtype", choices=["bfloat16", "float32"], help="default bfloat16 (CPU: float32)")
    sampling.add_argument("--warmup-runs", type=int, default=1)
    sampling.add_argument("--repeats", type=int, help="timed runs per row, the median reported (default 3; --tiny: 2)")
    args = parser.parse_args(argv)

    for name, values, known in (
        ("--sections", args.sections, ("train", "t2i", "caption")),
        ("--tasks", args.tasks, ("t2i", "edit")),
        ("--features", args.features, tuple(FEATURE_MODES)),
    ):
        unknown = sorted(set(values) - set(known))
        if unknown or not values:
            parser.error(f"{name}: {unknown or 'nothing'} given; choose from {', '.join(known)}")
    defaults = MODES["tiny" if args.tiny else "full"]
    for name in defaults:
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    return args


def training_config(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """The stage config with random weights and the benchmark's batch; global batch = micro x accumulation x ranks."""
    path = REPO / args.config if not Path(args.config).is_absolute() else Path(args.config)
    micro_batch = args.micro_batch or load_config(path).batch.micro_batch_size
    overrides = {
        "model.load_from": None,
        "resume_from": None,
        "batch.micro_batch_size": micro_batch,
        "batch.global_batch_size": micro_batch * args.accumulation * world_size,
        "logging.peak_tflops": args.peak_tflops,
    }
    if args.gradient_checkpointing != "config":
        overrides["model.gradient_checkpointing"] = args.gradient_checkpointing == "on"
    if args.zero_stage is not None:
        overrides["deepspeed.zero_stage"] = args.zero_stage
    return load_config(path, overrides)


def environment(argv: list[str], device: torch.device, tiny: bool) -> dict:
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=name,
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        deepspeed=deepspeed.__version__,
        command=shlex.join(["python", "scripts/benchmark.py", *argv]),
        tiny=tiny,
    )


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny and not args.allow_cpu:
        raise SystemExit(
            "scripts/benchmark.py: the full-size benchmark needs a CUDA GPU (a 2.1 B transformer in training, T5-XXL "
            "and the Qwen2.5-VL-7B teacher) and none is visible. Run it with --tiny for the CPU smoke check, or pass "
            "--allow-cpu to run the full size on the CPU anyway (hours, and tens of GB of memory)."
        )
    if args.tiny and not torch.cuda.is_available():
        # Tiny tensors: handing each op to a pool of threads costs more than the arithmetic, and threads that spin
        # while waiting for a busy core make a shared CI machine many times slower.
        torch.set_num_threads(1)
    ctx = init_distributed()
    if ctx.world_size != 1:
        raise SystemExit("scripts/benchmark.py measures one device: run it as a single process, not under a launcher.")
    device = ctx.device
    config = training_config(args, ctx.world_size)
    inference_dtype = DTYPES[args.inference_dtype or ("bfloat16" if device.type == "cuda" else "float32")]

    with tempfile.TemporaryDirectory() as folder:
        folders = make_tiny_components(Path(folder)) if args.tiny else write_full_size_folders(Path(folder))
        components = build_frozen_components(folders, config, device, args.seed)
    with torch.device("meta"):  # the transformer's config and size, for the FLOP count, before anything is built
        meta_transformer = UniAlignmentTransformer(**transformer_kwargs(config, components.t5.vocab_size))
    model_config = meta_transformer.config
    width = model_config.num_attention_heads * model_config.attention_head_dim
    token_table = {
        (task, resolution): token_counts(task, resolution, components, model_config)
        for resolution in args.resolutions
        for task in args.tasks
    }
    results = dict(
        header=environment(argv, device, args.tiny),
        setup=dict(
            parameters=dict(
                transformer=parameter_count(meta_transformer),
                t5=parameter_count(components.t5.encoder),
                vae=parameter_count(components.vae.vae),
                teacher=parameter_count(components.teacher.model),
            ),
            transformer=f"{model_config.num_layers} blocks, width {width}, text head {model_config.vocab_size}",
            components_dtype=config.components.dtype,
        ),
        model_config=model_config,
        peak_tflops=args.peak_tflops,
        flops=flops_rows(model_config, token_table),
    )

    if "train" in args.sections:
        rig = build_training(config, components, ctx)
        checkpointing = "on" if config.model.gradient_checkpointing else "off"
        precision = "bf16 compute, fp32 master weights" if config.deepspeed.precision == "bf16" else "fp32"
        results["setup"]["training"] = (
            f"{args.config}; DeepSpeed ZeRO-{config.deepspeed.zero_stage}, {precision}, AdamW, clip "
            f"{config.optimizer.clip_grad_norm}, EMA {config.ema_decay}; "
            f"micro-batch {config.batch.micro_batch_size} x {rig.accumulation} micro-step(s) per optimizer step; "
            f"gradient checkpointing {checkpointing}; {args.warmup_steps} warm-up + {args.steps} timed optimizer "
            "steps per row; synthetic batches, collated beforehand (the DataLoader's workers do that in training)"
        )
        results["training"] = benchmark_training(rig, token_table, args)
        rig.engine.destroy()
        del rig
        free_memory(device)

    if "t2i" in args.sections or "caption" in args.sections:
        pipeline = build_pipeline(config, components, device, inference_dtype, args.seed)
        results["setup"]["sampling"] = (
            f"transformer in {str(inference_dtype).removeprefix('torch.')}, T5 and VAE in {config.components.dtype}; "
            f"{args.warmup_runs} warm-up + {args.repeats} timed runs per row, the median reported; a call includes "
            "encoding the prompts or images and decoding the outputs"
        )
        if "t2i" in args.sections:
            results["text_to_image"] = benchmark_text_to_image(pipeline, args)
        if "caption" in args.sections:
            args.caption_length = args.caption_length or components.t5.max_length
            results["caption"] = benchmark_captions(pipeline, args)
    if not args.tiny:
        results["goals"] = goals(results)

    print(markdown(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        saved = {**results, "model_config": dict(model_config)}
        args.json.write_text(json.dumps(saved, indent=1, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
