"""The training configuration: typed sections, checked strictly.

Configs are mmengine Python files (`configs/_base_/*` and one short file per stage); `load_config` merges them,
applies command-line overrides (`--key value`, dotted keys) and turns the result into these dataclasses. An
unknown key or a value of the wrong type is an error that names it, so a typo never silently falls back to a
default. The defaults are the reference settings (docs/METHOD.md section 6).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmengine.config import Config

from unialignment.errors import UserError
from unialignment.frozen.components import ComponentsConfig
from unialignment.training.objective import ObjectiveConfig


class ConfigError(UserError):
    """A config key that is unknown, missing, of the wrong type or out of range; the message names it."""


def _check_range(section: str, values: dict[str, float], minimum: float, maximum: float | None = None) -> None:
    """Each value must lie in [minimum, maximum]; the error names `section.key` (NaN fails too)."""
    for name, value in values.items():
        if not (value >= minimum and (maximum is None or value <= maximum)):
            bound = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            key = f"{section}.{name}" if section else name
            raise ConfigError(f"{key}={value!r} is out of range: it must be {bound}")


@dataclass
class ModelConfig:
    """The trainable transformer. `load_from` (weights only) is an SD3 transformer or pipeline folder (stage 1),
    a UniAlignment transformer or pipeline folder (the authors' release, or a previous stage's export); None builds
    the transformer from `config` with fresh weights. `config` overrides transformer config fields."""

    load_from: str | None = None
    config: dict = field(default_factory=dict)
    lora_rank: int = 0  # > 0 trains LoRA adapters (diffusers' PEFT support) instead of all weights
    lora_alpha: float | None = None
    lora_target_modules: list[str] = field(
        default_factory=lambda: [
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "add_q_proj",
            "add_k_proj",
            "add_v_proj",
            "to_add_out",
        ]
    )

    def __post_init__(self):
        _check_range("model", {"lora_rank": self.lora_rank}, 0)


@dataclass
class SpeedConfig:
    """How a training step is computed, never what it computes: each switch is tested equal to the plain path on
    CPU (losses and gradients; within float tolerance where kernels or batch shapes differ, exactly where the math
    is the same). BENCHMARKS.md has their GPU measurements and says which are on by default and why.

    gradient_checkpointing: activation checkpointing of the joint blocks: False, True (every block) or k (every
        k-th block; the others keep their activations: less recomputation for more memory).
    compile_blocks: `torch.compile` of each joint block (regional compilation: one short compilation, shared by
        the blocks; a new resolution recompiles a block, not the model).
    fuse_t2i_passes: a text-to-image batch's image-stream and text-stream passes as one forward of 2B samples.
    masked_text_loss: the text head and its log-softmax at masked positions only, `text_loss_chunk_size` at a time
        (no (B, L, vocab) float32 tensors); needs the head's weight whole on each rank: ZeRO 0-2, no LoRA on it.
    prefetch: no host synchronisation inside a micro-step: all random draws made on the host ahead, in the same
        order, tensors sent with non-blocking copies, the prompts condition dropout replaces not encoded, and the
        loss scalars read once per optimizer step.
    uint8_pixels: pixels travel from the workers as uint8 and are scaled to [-1, 1] on the GPU.
    teacher_inputs_in_workers: the teacher's image processing and tokenization run in the DataLoader workers.
    compile_text_encoder: `torch.compile` of the frozen T5 encoder.
    pad_narrow_heads: heads narrower than 16 channels zero-padded to 16 for the CPU attention kernel (the same
        attention; faster on some CPUs, slower on others: `scripts/benchmark_attention.py`).
    """

    gradient_checkpointing: bool | int = True
    compile_blocks: bool = False
    fuse_t2i_passes: bool = False
    masked_text_loss: bool = False
    text_loss_chunk_size: int = 4096
    prefetch: bool = False
    uint8_pixels: bool = False
    teacher_inputs_in_workers: bool = False
    compile_text_encoder: bool = False
    pad_narrow_heads: bool = False

    def __post_init__(self):
        _check_range("speed", {"gradient_checkpointing": int(self.gradient_checkpointing)}, 0)
        _check_range("speed", {"text_loss_chunk_size": self.text_loss_chunk_size}, 1)


@dataclass
class DataConfig:
    """Task groups (see `unialignment.data.dataset.build_task_groups`) and how they are read."""

    groups: list[dict] = field(default_factory=list)
    resolution: int = 512
    aspect_ratio_buckets: bool = False
    schedule: Literal["alternate", "random"] = "alternate"
    num_workers: int = 4
    max_bad_fraction: float = 0.01
    check_images: bool = True
    use_feature_cache: bool = False
    max_replacement_attempts: int = 16
    draft_decode: bool = False  # decode JPEGs >= 2x the resolution at a reduced scale (transforms.load_image)

    def __post_init__(self):
        _check_range(
            "data", {"resolution": self.resolution, "max_replacement_attempts": self.max_replacement_attempts}, 1
        )
        _check_range("data", {"num_workers": self.num_workers}, 0)
        _check_range("data", {"max_bad_fraction": self.max_bad_fraction}, 0, 1)


@dataclass
class OptimizerConfig:
    """AdamW, the learning-rate schedule (linear warm-up, then constant or cosine) and gradient clipping."""

    lr: float = 3e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 2000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # the cosine schedule's floor, as a fraction of lr
    clip_grad_norm: float = 2.0

    def __post_init__(self):
        _check_range(
            "optimizer", {"lr": self.lr, "warmup_steps": self.warmup_steps, "weight_decay": self.weight_decay}, 0
        )
        _check_range("optimizer", {"clip_grad_norm": self.clip_grad_norm}, 0)


@dataclass
class BatchConfig:
    """The global batch is the primitive; per-rank accumulation is derived from it and the world size."""

    global_batch_size: int = 384
    micro_batch_size: int = 4

    def __post_init__(self):
        _check_range(
            "batch", {"global_batch_size": self.global_batch_size, "micro_batch_size": self.micro_batch_size}, 1
        )

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"batch.global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x world_size "
                f"= {self.micro_batch_size} x {world_size}; change global_batch_size or micro_batch_size"
            )
        return self.global_batch_size // per_step


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, CPU offload and precision of the DeepSpeed engine around the transformer."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 compute, fp32 master weights and gradient reduction
    # ZeRO's gradient reduction overlapped with backward, in buckets of this many elements (DeepSpeed's defaults).
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    gradient_communication: Literal["fp32", "bf16"] = "fp32"  # bf16 halves the traffic, rounds the sums
    overrides: dict = field(default_factory=dict)  # merged last into the generated DeepSpeed config

    def __post_init__(self):
        _check_range(
            "deepspeed",
            {"reduce_bucket_size": self.reduce_bucket_size, "allgather_bucket_size": self.allgather_bucket_size},
            1,
        )


@dataclass
class CheckpointConfig:
    """How often full checkpoints (and transformer exports) are written, and how many are kept."""

    every_steps: int = 5000
    keep_last: int = 3
    export: bool = True  # write EMA and raw weights as from_pretrained folders beside each checkpoint

    def __post_init__(self):
        _check_range("checkpoint", {"every_steps": self.every_steps, "keep_last": self.keep_last}, 1)


@dataclass
class LoggingConfig:
    """Scalars every `every_steps`; sample images and captions for fixed inputs every `sample_every_steps`."""

    every_steps: int = 10
    sample_every_steps: int = 1000
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat sitting on a wooden table"])
    sample_edits: list[dict] = field(default_factory=list)  # {"image": path, "instruction": text}
    caption_images: list[str] = field(default_factory=list)
    sample_steps: int = 28
    caption_steps: int = 32
    guidance_scale: float = 7.0
    sample_weights: Literal["ema", "raw"] = "ema"  # samples from the EMA (what exports default to) or raw weights
    peak_tflops: float = 989.0  # the GPU's dense bf16 peak, for the MFU estimate (H100 SXM: 989)
    tracker: Literal["tensorboard", "wandb"] = "tensorboard"  # wandb is an optional extra: pip install wandb

    def __post_init__(self):
        _check_range(
            "logging",
            {"every_steps": self.every_steps, "sample_steps": self.sample_steps, "caption_steps": self.caption_steps},
            1,
        )
        _check_range("logging", {"sample_every_steps": self.sample_every_steps}, 0)


@dataclass
class ValidationConfig:
    """A validation loss every `every_steps` (0: none) on a small fixed held-out set: the first
    `samples_per_group` records of each group, with timesteps, noise and masks drawn from `seed` alone, so that its
    curve compares across runs and carries no sampling noise. `groups` as `data.groups`."""

    groups: list[dict] = field(default_factory=list)
    every_steps: int = 0
    samples_per_group: int = 32
    seed: int = 1234

    def __post_init__(self):
        _check_range("validation", {"every_steps": self.every_steps}, 0)
        _check_range("validation", {"samples_per_group": self.samples_per_group}, 1)


@dataclass
class TrainConfig:
    work_dir: str = "runs/unialignment"
    seed: int = 0
    max_steps: int = 80_000
    resume_from: str | None = "auto"  # "auto": the run folder's latest checkpoint if any; a path; None
    ema_decay: float = 0.9995  # 0 switches EMA off
    max_nonfinite_in_a_row: int = 20
    distributed_timeout_minutes: float = 120  # how long a collective waits (rank 0 indexing while others wait)
    model: ModelConfig = field(default_factory=ModelConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        _check_range("", {"max_steps": self.max_steps, "max_nonfinite_in_a_row": self.max_nonfinite_in_a_row}, 1)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(
                f"ema_decay={self.ema_decay!r} is out of range: it must be in [0, 1) (0 switches EMA off)"
            )
        _check_range("components", {"text_length": self.components.text_length}, 2)
        if self.speed.masked_text_loss and self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "speed.masked_text_loss reads the text head's weight whole, which ZeRO-3 partitions; use "
                "deepspeed.zero_stage <= 2 or set speed.masked_text_loss=false"
            )
        head_adapted = self.model.lora_rank > 0 and "text_proj_out" in self.model.lora_target_modules
        if self.speed.masked_text_loss and head_adapted:
            raise ConfigError(
                "speed.masked_text_loss reads the text head's base weight, but model.lora_target_modules adapts "
                "text_proj_out; remove it from the targets or set speed.masked_text_loss=false"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """`value` converted to `annotation`, or a ConfigError naming `where`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (dict), got {type(value).__name__}")
        return build_section(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        return origin(_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a dict, got {type(value).__name__}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_section(cls: type, values: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from `values`, strictly: every key known, every value of its declared type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    converted = {key: _check_value(value, hints[key], f"{where}.{key}") for key, value in values.items()}
    return cls(**converted)


def parse_override(text: str) -> Any:
    """A command-line value: a Python literal (numbers, true/false, None, lists, dicts) or a plain string."""
    aliases = {"true": True, "false": False, "null": None, "none": None}
    if text.lower() in aliases:
        return aliases[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(text)  # "nan", "inf": not Python literals, but floats
    except ValueError:
        return text


def parse_overrides(arguments: list[str]) -> dict:
    """`--key value` or `--key=value` pairs (dotted keys) as a dict of parsed values (`parse_override`)."""
    overrides, position = {}, 0
    while position < len(arguments):
        argument = arguments[position]
        if argument.startswith("--local_rank") or argument.startswith("--local-rank"):
            position += 1 if "=" in argument else 2  # set by the deepspeed launcher; LOCAL_RANK says the same
            continue
        if not argument.startswith("--"):
            raise ConfigError(f"expected --key value, got {argument!r}")
        if "=" in argument:
            key, value = argument[2:].split("=", 1)
            position += 1
        else:
            if position + 1 >= len(arguments):
                raise ConfigError(f"{argument} has no value")
            key, value = argument[2:], arguments[position + 1]
            position += 2
        overrides[key.replace("-", "_")] = parse_override(value)
    return overrides


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Merge an mmengine config file with its bases and dotted-key overrides, then check it strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    config = Config.fromfile(str(path))
    if overrides:
        config.merge_from_dict(overrides)
    values = {key: value for key, value in config.to_dict().items() if not key.startswith("_")}
    return build_section(TrainConfig, values, where=path.name)


def load_config_json(path: str | Path) -> TrainConfig:
    """The merged config the trainer wrote into a run folder as JSON: read as data and checked strictly, never
    executed (an mmengine `.py` config is Python, so a run folder's `config.py` is not read by anything)."""
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return build_section(TrainConfig, values, where=path.name)
