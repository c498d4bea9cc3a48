"""An estimate of the GPU memory one rank of a training run needs, from parameter counts and activation sizes.

Used by `scripts/train.py CONFIG --check` (before the GPUs are taken) and `scripts/estimate_memory.py` (the README's
table). It is arithmetic, not a measurement; each term:

- transformer weights: 2 bytes per parameter in bf16 (4 in fp32), divided over the ranks by ZeRO-3;
- optimizer: fp32 master weights (bf16 only) and AdamW's two moments, 12 (bf16) or 8 (fp32) bytes per trainable
  parameter, divided over the ranks by ZeRO-1/2/3, on the CPU with `offload_optimizer`;
- gradients: 2 or 4 bytes per trainable parameter, fp32 partitions (4 bytes / ranks) plus a reduce bucket from ZeRO-2;
- EMA: 4 bytes per trainable parameter, sharded over the ranks (`ShardedEMA`);
- frozen components, all resident: T5's encoder, the VAE and the teacher in `components.dtype`;
- activations of one micro-batch: per token and block about 18 x D values in bf16 (the block's normed input, q, k,
  v, attention output and projection, residuals, the MLP's 4D hidden before and after GELU), with flash attention's
  O(T) memory; a checkpointed block keeps only its input (D values per token) and one block is recomputed at a time;
  plus the text head's (B, L, vocab) float32 logits and log-probabilities, unless `speed.masked_text_loss`;
- an allowance for the CUDA context, allocator fragmentation and DeepSpeed's buffers.

Checked against one measurement (BENCHMARKS.md, H100): forward and backward of both passes at 512 px, micro-batch 4,
float32 weights and gradients, bf16 autocast, no checkpointing: 31.9 GiB text-to-image, 39.5 GiB edit; this model
gives 32.8 and 37.9 GiB for that setting (weights and gradients 15.8 GiB, autocast's bf16 weight copies 4.0 GiB,
activations 3.2 and 4.4 GiB per sample). Read it as +-20%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoConfig, Qwen2_5_VLModel, T5EncoderModel

from unialignment.data.records import TaskKind
from unialignment.training.config import TrainConfig

GiB = 2**30
ACTIVATION_VALUES_PER_TOKEN = 18  # x D bf16 values per token per block, see the module docstring
ALLOWANCE_GIB = 3.0
# Condition images an image-stream pass carries, per task kind (a composition's count is its records'; two assumed).
CONDITION_IMAGES = {TaskKind.EDIT: 1, TaskKind.PERCEPTION: 1, TaskKind.COMPOSITION: 2}


@dataclass
class MemoryEstimate:
    """Bytes per term on one rank's GPU; `total` is their sum."""

    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        parts = ", ".join(f"{name} {value / GiB:.3g}" for name, value in self.parts.items() if value)
        return [f"estimated GPU memory per rank: {self.total / GiB:.1f} GiB ({parts}; GiB, +-20%)"]


def frozen_parameters(config: TrainConfig) -> dict[str, int]:
    """Parameter counts of the frozen components named by the config, from their config files (built on the meta
    device, no weights read): T5's encoder, the VAE, the teacher as the trainer keeps it (no decoder layers)."""
    components = config.components
    with torch.device("meta"):
        counts = {
            "t5": _count(T5EncoderModel(AutoConfig.from_pretrained(components.folder("text_encoder")))),
            "vae": _count(AutoencoderKL.from_config(AutoencoderKL.load_config(components.folder("vae")))),
        }
        if components.teacher is not None:
            teacher_config = AutoConfig.from_pretrained(Path(components.teacher))
            teacher_config.text_config.num_hidden_layers = 0
            teacher_config.text_config.layer_types = []
            counts["teacher"] = _count(Qwen2_5_VLModel._from_config(teacher_config))
    return counts


def _condition_images(task: str | None) -> int:
    if task is None:  # inferred per record: an edit is assumed
        return 1
    return CONDITION_IMAGES.get(TaskKind.parse(task), 0)


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def activation_bytes_per_sample(
    model_config: dict, image_tokens: int, condition_tokens: int, text_tokens: int, checkpoint_every: int
) -> float:
    """Activation bytes one training sample keeps for backward: both passes (the text-stream pass has no
    condition images), `checkpoint_every` as `speed.gradient_checkpointing` (0: off)."""
    width = model_config["num_attention_heads"] * model_config["attention_head_dim"]
    layers = model_config["num_layers"]
    checkpointed = layers // checkpoint_every if checkpoint_every else 0
    total = 0.0
    for tokens in (image_tokens + condition_tokens + text_tokens, image_tokens + text_tokens):
        full_block = ACTIVATION_VALUES_PER_TOKEN * width * tokens * 2
        kept_input = width * tokens * 2
        recompute = full_block if checkpointed else 0.0
        total += (layers - checkpointed) * full_block + checkpointed * kept_input + recompute
    return total


def training_memory(
    config: TrainConfig,
    world_size: int,
    model_config: dict,
    parameters: int,
    trainable: int,
    frozen: dict[str, int],
    resolution: int | None = None,
    vae_downsampling: int = 8,
) -> MemoryEstimate:
    """The estimate for `config` on `world_size` ranks (see the module docstring). `resolution` defaults to the
    data's; the largest image-stream pass among the configured tasks is assumed."""
    ds, speed = config.deepspeed, config.speed
    bf16 = ds.precision == "bf16"
    ranks_optimizer = world_size if ds.zero_stage >= 1 else 1
    weights = (2 if bf16 else 4) * parameters / (world_size if ds.zero_stage == 3 else 1)
    optimizer = 0.0 if ds.offload_optimizer else (12 if bf16 else 8) * trainable / ranks_optimizer
    if ds.zero_stage >= 2:
        gradients = 4 * trainable / world_size + 4 * min(ds.reduce_bucket_size, trainable)
    else:
        gradients = (2 if bf16 else 4) * trainable + (4 * trainable / ranks_optimizer if bf16 else 0)
    ema = 4 * trainable / world_size if config.ema_decay > 0 else 0.0
    frozen_bytes = (2 if config.components.dtype in ("bfloat16", "float16") else 4) * sum(frozen.values())

    resolution = resolution or config.data.resolution
    side = resolution // vae_downsampling // model_config["patch_size"]
    image_tokens = side * side
    tasks = [dataset.get("task") for group in config.data.groups for dataset in group.get("datasets", [])]
    conditions = max([_condition_images(task) for task in tasks] or [0])
    text_tokens = config.components.text_length
    per_sample = activation_bytes_per_sample(
        model_config, image_tokens, conditions * image_tokens, text_tokens, int(speed.gradient_checkpointing)
    )
    if not speed.masked_text_loss:  # logits, log-probabilities and their gradient, float32
        per_sample += 3 * 4 * text_tokens * model_config["vocab_size"]
    activations = config.batch.micro_batch_size * per_sample
    return MemoryEstimate(
        {
            "transformer weights": weights,
            "optimizer": optimizer,
            "gradients": gradients,
            "EMA": ema,
            "frozen components": frozen_bytes,
            "activations": activations,
            "allowance": ALLOWANCE_GIB * GiB,
        }
    )
