"""Before the GPUs are taken: everything about a run that can be checked without loading a weight.

`python scripts/train.py CONFIG --check` (which `train_unialignment.sh` runs before launching) loads and validates
the merged config, indexes and validates every data file (writing the skip report and the index caches the run
then reuses), reads every component folder's config, the tokenizer and the mask embedding, builds the transformer
on the meta device, derives the batch layout for the world size and estimates the GPU memory per rank
(`unialignment.training.memory`). Any problem raises a `UserError` naming the file, line or key; otherwise it
returns the lines of a summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from unialignment.data.dataset import build_task_groups
from unialignment.frozen.text_encoder import load_mask_embedding, load_t5_tokenizer
from unialignment.frozen.vae import downsample_factor
from unialignment.models import UniAlignmentTransformer
from unialignment.training.builders import transformer_config
from unialignment.training.config import ConfigError, TrainConfig
from unialignment.training.memory import MemoryEstimate, frozen_parameters, training_memory


@dataclass
class RunShape:
    """What the checked run will be: sizes the memory estimate and the summary need."""

    world_size: int
    accumulation: int
    parameters: int
    model_config: dict
    size_multiple: int
    max_side: int  # the largest image side the position table covers, in pixels
    memory: MemoryEstimate


def _json_config(folder: Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{what}: {folder} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what}: {path}:{error.lineno}: not valid JSON ({error.msg})") from None


def check_components(config: TrainConfig) -> tuple[int, int, int]:
    """Every component folder's config, the tokenizer and the mask embedding, without weights; returns
    (len(tokenizer), T5 width, VAE downsampling)."""
    components = config.components
    tokenizer = load_t5_tokenizer(components.folder("tokenizer"))
    t5_config = _json_config(Path(components.folder("text_encoder")), "components.text_encoder")
    vae_config = _json_config(Path(components.folder("vae")), "components.vae")
    if components.teacher is not None:
        _json_config(Path(components.teacher), "components.teacher")
    if components.mask_embedding_file() is not None:
        load_mask_embedding(components.mask_embedding_file(), t5_config["d_model"])
    return len(tokenizer), t5_config["d_model"], downsample_factor(_Config(vae_config))


class _Config(dict):
    """A config.json dict read by attribute, as the helpers that take a model's `config` do."""

    __getattr__ = dict.__getitem__


def check_run(config: TrainConfig, world_size: int) -> RunShape:
    """Check the run as the trainer would start it on `world_size` ranks; see the module docstring."""
    accumulation = config.batch.gradient_accumulation_steps(world_size)
    vocab_size, t5_width, vae_downsampling = check_components(config)
    model_config = transformer_config(config, vocab_size)
    with torch.device("meta"):
        model = UniAlignmentTransformer.from_config(model_config)
    if model.config.vocab_size != vocab_size:
        raise ConfigError(
            f"model: the transformer's text head has {model.config.vocab_size} entries but the T5 tokenizer has "
            f"{vocab_size} tokens; they must be equal"
        )
    if model.config.joint_attention_dim != t5_width:
        raise ConfigError(
            f"model: the transformer reads {model.config.joint_attention_dim}-wide text states but the T5 encoder of "
            f"components.text_encoder makes {t5_width}"
        )
    patch = model.config.patch_size
    size_multiple = vae_downsampling * patch
    max_side = model.config.pos_embed_max_size * size_multiple
    try:
        Path(config.work_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"work_dir: the run folder {config.work_dir} cannot be written: {error}") from None
    groups = build_task_groups(
        config.data.groups,
        config.data.resolution,
        config.data.aspect_ratio_buckets,
        config.data.check_images,
        config.data.max_bad_fraction,
        report_path=Path(config.work_dir) / "skipped_lines.txt",
        size_multiple=size_multiple,
    )
    check_image_sides(config, [side for group in groups for bucket in group.pool_buckets for side in bucket], max_side)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = lora_parameters(model, config) if config.model.lora_rank > 0 else parameters
    memory = training_memory(
        config, world_size, dict(model.config), parameters, trainable, frozen_parameters(config),
        vae_downsampling=vae_downsampling,
    )  # fmt: skip
    return RunShape(world_size, accumulation, parameters, dict(model.config), size_multiple, max_side, memory)


def lora_parameters(model: torch.nn.Module, config: TrainConfig) -> int:
    """Parameters LoRA adds: rank x (in + out) per adapted linear layer (the trainable ones of a LoRA run)."""
    targets = config.model.lora_target_modules
    rank = config.model.lora_rank
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    )


def check_image_sides(config: TrainConfig, sides: list[int], max_side: int) -> None:
    """Every image side the run will see must fit the transformer's position table."""
    if sides and max(sides) > max_side:
        raise ConfigError(
            f"data.resolution={config.data.resolution}: images of {max(sides)} px do not fit the transformer's "
            f"position table, which covers at most {max_side} px (pos_embed_max_size x patch size x VAE "
            f"downsampling); set data.resolution to {max_side} or less"
        )


def summary(config: TrainConfig, shape: RunShape) -> list[str]:
    batch = config.batch
    return [
        f"config checked: {config.work_dir} (ZeRO-{config.deepspeed.zero_stage}, {config.deepspeed.precision})",
        f"world size {shape.world_size}: global batch {batch.global_batch_size} = micro-batch "
        f"{batch.micro_batch_size} x {shape.accumulation} accumulation steps x {shape.world_size} ranks",
        f"transformer: {shape.parameters / 1e9:.3f} B parameters; images up to {shape.max_side} px, sides "
        f"multiples of {shape.size_multiple}; data at {config.data.resolution} px",
        *shape.memory.lines(),
        f"skipped lines, if any: {Path(config.work_dir) / 'skipped_lines.txt'}",
    ]
