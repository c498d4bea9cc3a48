"""What a training run is built from, shared by the trainer and the benchmark: the transformer, DeepSpeed's config,
the learning-rate schedule, the engine, the EMA, the objective and the run's random generator.

`build_training` assembles them into a `TrainingRig`, the object `unialignment.training.step.optimizer_step`
steps; the trainer adds data, logging and checkpoints around it, the benchmark synthetic batches and timing.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unialignment.files import model_folder
from unialignment.frozen.components import FrozenComponents
from unialignment.models import UniAlignmentTransformer
from unialignment.models.sd3_init import init_from_sd3
from unialignment.training.config import ConfigError, TrainConfig
from unialignment.training.distributed import DistributedContext
from unialignment.training.ema import ShardedEMA
from unialignment.training.objective import UniAlignmentObjective


def transformer_folder(path: str | Path) -> Path:
    """A transformer folder, or a pipeline folder holding one in `transformer/` (either may be a hub repo id)."""
    path = model_folder(path, "model.load_from")
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"model.load_from: {path} holds no config.json and no transformer/config.json")


# `model.config` fields a loaded model may take from the stage config: neither changes a weight or what one means
# (the default image size; the block the alignment heads read). Any other field must match the saved config.
LOAD_OVERRIDABLE = frozenset({"sample_size", "align_depth"})


def _load_overrides(folder: Path, model_config: dict) -> dict:
    """The `model.config` entries to pass on when loading `folder`: those that differ from its config.json must be
    in LOAD_OVERRIDABLE. Loading with, say, another head count would silently re-split the saved attention weights
    (8 x 16 and 4 x 32 have the same shapes), so every other difference is an error naming the field."""
    saved = json.loads((folder / "config.json").read_text())
    parameters = inspect.signature(UniAlignmentTransformer.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if name != "self"}
    unknown = sorted(set(model_config) - set(defaults))
    if unknown:
        raise ConfigError(f"model.config: {', '.join(unknown)} is not a UniAlignmentTransformer config field")
    changed = {}
    for name, value in model_config.items():
        stored = saved.get(name, defaults[name])
        if _same_setting(stored, value):
            continue
        if name not in LOAD_OVERRIDABLE:
            raise ConfigError(
                f"model.config.{name}={value!r} but {folder / 'config.json'} has {name}={stored!r}: a loaded model "
                f"keeps its architecture; remove model.config.{name} or set it to {stored!r} "
                f"(only {', '.join(sorted(LOAD_OVERRIDABLE))} may change on load)"
            )
        changed[name] = value
    return changed


def _same_setting(a, b) -> bool:
    """Equal as config.json keeps them (a tuple is saved as a list)."""
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def transformer_config(config: TrainConfig, vocab_size: int) -> dict:
    """The config `build_transformer` would build the transformer with, read from config files only (no weights):
    `UniAlignmentTransformer.from_config` of it on the meta device gives the model's shapes."""
    model_config = dict(config.model.config)
    if config.model.load_from is None:
        return {"vocab_size": vocab_size, **model_config}
    folder = transformer_folder(Path(config.model.load_from))
    saved = json.loads((folder / "config.json").read_text())
    fields = inspect.signature(UniAlignmentTransformer.__init__).parameters
    if saved.get("_class_name") == "SD3Transformer2DModel":  # as init_from_sd3 builds it
        return {**{k: v for k, v in saved.items() if k in fields}, "vocab_size": vocab_size, **model_config}
    return {**{k: v for k, v in saved.items() if k in fields}, **_load_overrides(folder, model_config)}


def transformer_patch_size(config: TrainConfig) -> int:
    """The patch size of the transformer `build_transformer` would build, read without building it."""
    default = inspect.signature(UniAlignmentTransformer.__init__).parameters["patch_size"].default
    return transformer_config(config, vocab_size=0).get("patch_size", default)


def build_transformer(config: TrainConfig, vocab_size: int) -> tuple[UniAlignmentTransformer, str]:
    """The transformer named by `model.load_from` (SD3, the released model, or an export), or a fresh one."""
    model_config = dict(config.model.config)
    if config.model.load_from is None:
        model = UniAlignmentTransformer(**{"vocab_size": vocab_size, **model_config})
        source = "fresh weights"
    else:
        folder = transformer_folder(Path(config.model.load_from))
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
        if class_name == "SD3Transformer2DModel":
            model, report = init_from_sd3(folder, vocab_size=vocab_size, **model_config)
            source = f"SD3 transformer {folder}:\n{report.summary()}"
        else:
            kept = _load_overrides(folder, model_config)
            model = UniAlignmentTransformer.from_pretrained(folder, **kept)
            source = f"{class_name} weights from {folder}"
            if kept:
                source += " (from the stage config: " + ", ".join(f"{k}={v!r}" for k, v in kept.items()) + ")"
    if model.config.vocab_size != vocab_size:
        raise ConfigError(
            f"the transformer's text head has {model.config.vocab_size} entries but the T5 tokenizer has {vocab_size} "
            "tokens; they must be equal"
        )
    if config.model.lora_rank > 0:
        from peft import LoraConfig  # only LoRA runs need peft

        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=config.model.lora_rank,
                lora_alpha=config.model.lora_alpha or config.model.lora_rank,
                target_modules=config.model.lora_target_modules,
                init_lora_weights="gaussian",
            )
        )
    return model, source


def set_checkpointing(model: UniAlignmentTransformer, every: bool | int) -> None:
    """`speed.gradient_checkpointing` on a built model: off, every block (True) or every k-th block."""
    if every:
        model.enable_gradient_checkpointing()
        model.checkpoint_every = int(every)
    else:
        model.disable_gradient_checkpointing()


def build_objective(config: TrainConfig, components: FrozenComponents) -> UniAlignmentObjective:
    """The objective with the run's constants and its `speed` switches."""
    t5 = components.t5
    return UniAlignmentObjective(
        config.objective,
        FlowMatchEulerDiscreteScheduler(),
        t5.mask_token_id,
        t5.encode_ids,
        t5.null_prompt_embeds(),
        fuse_t2i_passes=config.speed.fuse_t2i_passes,
        masked_text_loss=config.speed.masked_text_loss,
        text_loss_chunk_size=config.speed.text_loss_chunk_size,
    )


def deepspeed_config(config: TrainConfig, accumulation: int, world_size: int, on_gpu: bool) -> dict:
    optimizer, ds = config.optimizer, config.deepspeed
    zero = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        zero.update(
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=True,
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    result = {
        "train_batch_size": config.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": config.batch.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": optimizer.clip_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optimizer.lr,
                "betas": list(optimizer.betas),
                "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay,
                # Fused Adam is CUDA-only; on CPU DeepSpeed falls back to torch's AdamW.
                "torch_adam": not on_gpu and not ds.offload_optimizer,
            },
        },
        "zero_optimization": zero,
        # bf16 compute with fp32 master weights (DeepSpeed keeps them), gradients reduced in fp32 (or bf16), and a
        # step with a non-finite gradient norm skipped rather than applied.
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": True},
        "communication_data_type": ds.gradient_communication,
        "steps_per_print": 2**31 - 1,
    }
    return _merge(result, ds.overrides)


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def learning_rate_lambda(config: TrainConfig):
    """Linear warm-up to 1, then constant (the reference) or cosine down to `min_lr_ratio`."""
    warmup, total, floor = config.optimizer.warmup_steps, config.max_steps, config.optimizer.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.optimizer.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_run(config: TrainConfig, rank: int) -> torch.Generator:
    """Seed torch's global generator (fresh weights, dropout) and return the run's own CPU generator, from which
    every random draw of the objective and of latent sampling is made, so that a checkpoint can save its state."""
    torch.manual_seed(config.seed + rank)
    return torch.Generator().manual_seed(config.seed * 1000 + rank)


def training_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype batches reach the transformer in: bf16 compute, or float32."""
    return torch.bfloat16 if config.deepspeed.precision == "bf16" else torch.float32


@dataclass
class TrainingRig:
    """Everything one optimizer step needs: the DeepSpeed engine around the transformer, its scheduler and EMA, the
    objective, the frozen components, the run's generator and where batches go."""

    config: TrainConfig
    components: FrozenComponents
    engine: deepspeed.DeepSpeedEngine
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ShardedEMA | None
    objective: UniAlignmentObjective
    generator: torch.Generator
    ctx: DistributedContext
    dtype: torch.dtype
    accumulation: int

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling x the transformer's patch size."""
        return self.components.vae.downsample_factor * self.engine.module.config.patch_size


def build_training(
    config: TrainConfig,
    components: FrozenComponents,
    ctx: DistributedContext,
    generator: torch.Generator,
    init_device: torch.device | None = None,
) -> tuple[TrainingRig, str]:
    """The transformer (`build_transformer`, fresh weights made on `init_device`, default the CPU), wrapped by
    DeepSpeed with AdamW and the schedule, its EMA and the objective; returns the rig and where the weights came
    from."""
    with torch.device(init_device or "cpu"):
        model, source = build_transformer(config, components.t5.vocab_size)
    set_checkpointing(model, config.speed.gradient_checkpointing)
    if config.speed.pad_narrow_heads:
        model.pad_narrow_heads()
    if config.speed.compile_blocks:
        model.compile_blocks()
    if config.speed.compile_text_encoder:
        components.t5.encoder.compile()
    trainable = [param for param in model.parameters() if param.requires_grad]
    accumulation = config.batch.gradient_accumulation_steps(ctx.world_size)
    engine, _, _, lr_scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=deepspeed_config(config, accumulation, ctx.world_size, ctx.device.type == "cuda"),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config)),
    )
    ema = ShardedEMA(engine.module, config.ema_decay, ctx.rank, ctx.world_size) if config.ema_decay > 0 else None
    objective = build_objective(config, components)
    rig = TrainingRig(
        config, components, engine, lr_scheduler, ema, objective, generator, ctx, training_dtype(config), accumulation
    )
    return rig, source
