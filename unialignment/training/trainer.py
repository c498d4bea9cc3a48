"""The UniAlignment trainer: DeepSpeed around the transformer, frozen components beside it, one task per step.

Each optimizer step takes one task group from the sampler; each of its micro-steps encodes the batch with the
frozen components (or reads the offline cache), runs the objective (image stream, text stream, both alignments)
and lets DeepSpeed accumulate, clip, reduce and step. DeepSpeed skips a step whose gradient norm is not finite;
the trainer counts such steps and stops after `max_nonfinite_in_a_row` of them. Checkpoints hold everything an
exact resume needs; exports are ordinary `from_pretrained` folders. Only rank 0 logs.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from huggingface_hub import save_torch_state_dict
from mmengine.config import Config
from torch.utils.data import DataLoader
from tqdm import tqdm

from unialignment.data.collate import Collator
from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
from unialignment.data.feature_cache import components_fingerprint
from unialignment.data.features import FrozenComponents, prepare_training_batch
from unialignment.data.sampler import TaskMixingSampler
from unialignment.frozen.teacher import QwenVLTeacher
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.frozen.vae import FrozenVAE
from unialignment.models import UniAlignmentTransformer
from unialignment.models.sd3_init import init_from_sd3
from unialignment.pipelines import UniAlignmentPipeline, image_grid
from unialignment.training import checkpoint as ckpt
from unialignment.training.config import ConfigError, TrainConfig
from unialignment.training.distributed import DistributedContext, all_reduce_sum, init_distributed
from unialignment.training.ema import ShardedEMA
from unialignment.training.flops import training_flops_per_sample
from unialignment.training.objective import UniAlignmentObjective

logger = logging.getLogger("unialignment.train")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _transformer_folder(path: Path) -> Path:
    """A transformer folder, or a pipeline folder holding one in `transformer/`."""
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


def build_transformer(config: TrainConfig, vocab_size: int) -> tuple[UniAlignmentTransformer, str]:
    """The transformer named by `model.load_from` (SD3, the released model, or an export), or a fresh one."""
    model_config = dict(config.model.config)
    if config.model.load_from is None:
        model = UniAlignmentTransformer(**{"vocab_size": vocab_size, **model_config})
        source = "fresh weights"
    else:
        folder = _transformer_folder(Path(config.model.load_from))
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
    if config.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
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


def load_components(config: TrainConfig, device: torch.device) -> FrozenComponents:
    components, dtype = config.components, DTYPES[config.components.dtype]
    t5 = FrozenT5.from_pretrained(
        components.folder("tokenizer", "tokenizer_3"),
        components.folder("text_encoder", "text_encoder_3"),
        dtype,
        device,
        components.mask_embedding,
        components.text_length,
    )
    vae = FrozenVAE.from_pretrained(components.folder("vae", "vae"), dtype, device)
    teacher = None
    if components.teacher is not None:
        teacher = QwenVLTeacher.from_pretrained(
            components.teacher,
            dtype,
            device,
            average_padding=components.teacher_average_padding,
            max_text_length=components.text_length,
        )
    return FrozenComponents(t5, vae, teacher)


def deepspeed_config(config: TrainConfig, accumulation: int, world_size: int, on_gpu: bool) -> dict:
    optimizer, ds = config.optimizer, config.deepspeed
    zero = {"stage": ds.zero_stage}
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
        # bf16 compute with fp32 master weights (DeepSpeed keeps them), gradients reduced in fp32, and a step with
        # a non-finite gradient norm skipped rather than applied.
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": True},
        "communication_data_type": "fp32",
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


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.ctx: DistributedContext = init_distributed()
        self.work_dir = Path(config.work_dir)
        self.accumulation = config.batch.gradient_accumulation_steps(self.ctx.world_size)
        self._set_up_run_folder()
        if self.ctx.device.type == "cpu":
            # As weights settle, tiny (denormal) floats appear and slow every CPU matmul that meets them; flushing
            # them to zero made the toy stages 8-15% faster on 2 cores, with no effect on GPUs.
            torch.set_flush_denormal(True)
        torch.manual_seed(config.seed + self.ctx.rank)
        # Every random draw of the objective and of latent sampling comes from this generator; it is saved.
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.ctx.rank)
        self.dtype = torch.bfloat16 if config.deepspeed.precision == "bf16" else torch.float32

        self.components = load_components(config, self.ctx.device)
        model, source = build_transformer(config, self.components.t5.vocab_size)
        logger.info("transformer: %s", source)
        self.model_config = model.config
        self._build_data()

        trainable = [p for p in model.parameters() if p.requires_grad]
        logger.info("trainable parameters: %.3f M", sum(p.numel() for p in trainable) / 1e6)
        ds_config = deepspeed_config(config, self.accumulation, self.ctx.world_size, self.ctx.device.type == "cuda")
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config)),
        )
        self.ema = (
            ShardedEMA(self.engine.module, config.ema_decay, self.ctx.rank, self.ctx.world_size)
            if config.ema_decay > 0
            else None
        )
        self.objective = UniAlignmentObjective(
            config.objective,
            FlowMatchEulerDiscreteScheduler(),
            self.components.t5.mask_token_id,
            self.components.t5.encode_ids,
            self.components.t5.null_prompt_embeds(),
        )
        self.step, self.skipped_steps, self.nonfinite_in_a_row = 0, 0, 0
        self._resume()

    # --- set-up ----------------------------------------------------------------------------------------------

    def _set_up_run_folder(self) -> None:
        if self.ctx.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            # The merged, checked config, so a run folder says exactly what ran.
            Config(self.config.to_dict()).dump(str(self.work_dir / "config.py"))
            handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(self.work_dir / "train.log")]
        else:  # other ranks speak only to warn (a replaced sample, a skipped step), so nothing they see is lost
            handlers = [logging.StreamHandler(sys.stderr)]
        for handler in handlers:
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s rank{self.ctx.rank} %(levelname)s %(message)s", "%H:%M:%S")
            )
            logger.addHandler(handler)
        logger.setLevel(logging.INFO if self.ctx.is_main else logging.WARNING)
        logger.propagate = False
        self.ctx.barrier()

    def _build_data(self) -> None:
        config, data = self.config, self.config.data
        # Rank 0 indexes (and caches) every file first; the others then load the cached indexes.
        for turn in ("main", "others"):
            if (turn == "main") == self.ctx.is_main:
                self.groups = build_task_groups(
                    data.groups,
                    data.resolution,
                    data.aspect_ratio_buckets,
                    data.check_images,
                    data.max_bad_fraction,
                    report_path=self.work_dir / "skipped_lines.txt" if self.ctx.is_main else None,
                    progress=self.ctx.is_main,
                )
            self.ctx.barrier()
        for group in self.groups:
            logger.info(
                "task group %s: %d records in %d pools, weight %s",
                group.name,
                len(group),
                len(group.pool_sizes),
                group.weight,
            )
        self.sampler = TaskMixingSampler(
            [group.pool_sizes for group in self.groups],
            [group.weight for group in self.groups],
            config.batch.micro_batch_size,
            self.accumulation,
            self.ctx.rank,
            self.ctx.world_size,
            seed=config.seed,
            schedule=data.schedule,
            num_steps=config.max_steps,
        )
        self.dataset = UniAlignmentDataset(
            self.groups,
            data.max_replacement_attempts,
            data.use_feature_cache,
            components_fingerprint(self.components) if data.use_feature_cache else None,
        )
        self.collator = Collator(self.components.t5.tokenizer, self.components.t5.max_length)

    def _loader(self) -> DataLoader:
        workers = self.config.data.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collator,
            num_workers=workers,
            pin_memory=self.ctx.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
        )

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _resume(self) -> None:
        folder = ckpt.resolve_resume(self.config.resume_from, self.work_dir)
        if folder is None:
            logger.info("starting at step 0")
            return
        _, client_state = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
        state = client_state["unialignment"]
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.sampler.load_state_dict(state["sampler"])
        rank_state = ckpt.load_rank_state(folder, self.ctx.rank)
        ckpt.restore_rng_state(rank_state["rng"], self.generator)
        self.nonfinite_in_a_row = rank_state["nonfinite_in_a_row"]
        if self.ema is not None:
            self.ema.load_state_dict(rank_state["ema"])
        logger.info("resumed from %s at step %d", folder, self.step)

    def save_checkpoint(self) -> None:
        tag = ckpt.tag_for_step(self.step)
        root = ckpt.checkpoint_root(self.work_dir)
        # Under a key of our own: DeepSpeed keeps names such as "skipped_steps" for itself.
        client_state = {
            "unialignment": {
                "step": self.step,
                "skipped_steps": self.skipped_steps,
                "sampler": self.sampler.state_dict(next_step=self.step),
            }
        }
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        ckpt.save_rank_state(
            root / tag,
            self.ctx.rank,
            {
                "ema": self.ema.state_dict() if self.ema is not None else {},
                "rng": ckpt.rng_state(self.generator),
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
            },
        )
        self.ctx.barrier()
        if self.config.checkpoint.export:
            self.export(tag)
        self.ctx.barrier()
        if self.ctx.is_main:
            ckpt.write_latest(self.work_dir, tag)
            for removed in ckpt.prune_checkpoints(self.work_dir, self.config.checkpoint.keep_last):
                logger.info("removed old checkpoint %s", removed)
            logger.info("checkpoint %s written", root / tag)
        self.ctx.barrier()

    def _raw_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.config.deepspeed.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()  # a collective; full dict on rank 0
        return self.engine.module.state_dict() if self.ctx.is_main else None

    def export(self, tag: str) -> None:
        """`export/<tag>/raw` and `export/<tag>/ema` as transformer folders (LoRA runs: adapter weights only)."""
        folder = self.work_dir / "export" / tag
        module = self.engine.module
        raw = self._raw_state_dict()
        ema = self.ema.gather() if self.ema is not None else None
        if not self.ctx.is_main:
            return
        lora = self.config.model.lora_rank > 0
        for kind, state in (("raw", raw), ("ema", ema)):
            if state is None:
                continue
            if kind == "ema":  # buffers (the position table) are not averaged: take them from the model
                state = {**{k: v for k, v in raw.items() if k not in state and not lora}, **state}
            if lora:  # diffusers' LoRA file layout: adapter tensors only, "transformer."-prefixed, no adapter name
                state = {f"transformer.{n.replace('.default', '')}": t for n, t in state.items() if "lora_" in n}
            target = folder / kind
            target.mkdir(parents=True, exist_ok=True)
            module.save_config(target)
            pattern = (
                "pytorch_lora_weights{suffix}.safetensors" if lora else "diffusion_pytorch_model{suffix}.safetensors"
            )
            # clone: DeepSpeed keeps parameters as views of one flat buffer, which safetensors refuses to save
            tensors = {name: tensor.detach().cpu().clone() for name, tensor in state.items()}
            save_torch_state_dict(tensors, target, filename_pattern=pattern)
        ckpt.point_export(self.work_dir, tag)

    # --- the loop --------------------------------------------------------------------------------------------

    def _flops_per_sample(self, batch) -> int:
        patch = self.model_config.patch_size

        def tokens(latents: torch.Tensor) -> int:
            return latents.shape[-2] * latents.shape[-1] // patch**2

        condition_tokens = sum(tokens(latents) for latents in batch.condition_latents or [])
        return training_flops_per_sample(
            self.model_config, tokens(batch.target_latents), batch.caption_ids.shape[1], condition_tokens
        )

    def train(self) -> None:
        config = self.config
        writer = None
        if self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self.work_dir / "tensorboard")
        metrics_file = open(self.work_dir / "metrics.jsonl", "a") if self.ctx.is_main else None  # noqa: SIM115
        progress = tqdm(
            total=config.max_steps, initial=self.step, desc="train", disable=not self.ctx.is_main, dynamic_ncols=True
        )
        batches = iter(self._loader())
        samples_per_step = config.batch.global_batch_size
        self.engine.train()
        try:
            while self.step < config.max_steps:
                started = time.perf_counter()
                step_losses, replaced, truncated, flops = [], 0, 0, 0
                for micro_step in range(self.accumulation):
                    raw = next(batches)
                    if (raw.step, raw.micro_step) != (self.step, micro_step):
                        raise RuntimeError(
                            f"data out of step: got step {raw.step}.{raw.micro_step}, training {self.step}.{micro_step}"
                        )
                    for failure in raw.replaced:
                        logger.warning("replaced an unreadable sample: %s", failure)
                    batch = prepare_training_batch(raw, self.components, self.generator, self.ctx.device, self.dtype)
                    losses = self.objective(self.engine, batch, self.generator)
                    self.engine.backward(losses.total)
                    self.engine.step()
                    step_losses.append(losses.scalars())
                    replaced, truncated = replaced + len(raw.replaced), truncated + raw.num_truncated
                    flops += self._flops_per_sample(batch) * len(raw)
                applied = self.engine.was_step_applied()
                if applied:
                    self.nonfinite_in_a_row = 0
                    if self.ema is not None:
                        self.ema.update()
                else:
                    self.skipped_steps += 1
                    self.nonfinite_in_a_row += 1
                    logger.warning(
                        "step %d skipped: non-finite loss or gradient (%d in a row)", self.step, self.nonfinite_in_a_row
                    )
                self.step += 1
                progress.update(1)
                elapsed = time.perf_counter() - started
                means = {name: sum(s[name] for s in step_losses) / len(step_losses) for name in step_losses[0]}
                # One collective per step: loss sums (averaged below), replaced samples and FLOPs over all ranks.
                totals = all_reduce_sum({**means, "_replaced": replaced, "_flops": flops}, self.ctx.device)
                replaced, flops = totals.pop("_replaced"), totals.pop("_flops")
                means = {name: total / self.ctx.world_size for name, total in totals.items()}
                record = {
                    "step": self.step,
                    **{f"loss/{k}": v for k, v in means.items()},
                    "lr": self.lr_scheduler.get_last_lr()[0],
                    "samples_per_s": samples_per_step / elapsed,
                    "replaced_samples": replaced,
                    "truncated_texts": truncated,
                    "skipped_steps": self.skipped_steps,
                }
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if self.ctx.device.type == "cuda":
                    record["mfu"] = flops / elapsed / (config.logging.peak_tflops * 1e12 * self.ctx.world_size)
                if self.ctx.is_main:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    progress.set_postfix(loss=f"{means['total']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                    for name, value in record.items():
                        if name != "step":
                            writer.add_scalar(name if "/" in name else f"train/{name}", value, self.step)
                    if self.step % config.logging.every_steps == 0:
                        logger.info(
                            "step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
                        )
                if self.nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
                    raise RuntimeError(
                        f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient; "
                        f"stopping. The last complete checkpoint is {ckpt.latest_checkpoint(self.work_dir)}; lower "
                        "the learning rate or check the data before resuming."
                    )
                if config.logging.sample_every_steps and self.step % config.logging.sample_every_steps == 0:
                    self.log_samples(writer)
                if self.step % config.checkpoint.every_steps == 0 or self.step == config.max_steps:
                    self.save_checkpoint()
        finally:
            progress.close()
            if metrics_file is not None:
                metrics_file.close()
            if writer is not None:
                writer.close()

    def log_samples(self, writer) -> None:
        """Images for the fixed prompts and edits, captions for the fixed images, into the run folder and
        TensorBoard. Under ZeRO-3 every rank takes part (the weights are partitioned); rank 0 writes."""
        if self.config.deepspeed.zero_stage != 3 and not self.ctx.is_main:
            return
        settings, resolution = self.config.logging, self.config.data.resolution
        folder = self.work_dir / "samples" / ckpt.tag_for_step(self.step)
        t5 = self.components.t5
        # FrozenT5 set the tokenizer's model_max_length to the training length, which is what the pipeline reads.
        pipeline = UniAlignmentPipeline(
            transformer=self.engine.module,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=self.components.vae.vae,
            text_encoder=t5.encoder,
            tokenizer=t5.tokenizer,
        )
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(self.config.seed)
        size = dict(height=resolution, width=resolution)
        image_settings = dict(
            size, num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance_scale, generator=generator
        )
        self.engine.eval()
        outputs = {}
        if settings.sample_prompts:
            outputs["t2i"] = pipeline.text_to_image(settings.sample_prompts, **image_settings).images
        if settings.sample_edits:
            from PIL import Image

            sources = [Image.open(edit["image"]).convert("RGB") for edit in settings.sample_edits]
            instructions = [edit["instruction"] for edit in settings.sample_edits]
            outputs["edit"] = pipeline.edit(sources, instructions, **image_settings).images
        captions = []
        if settings.caption_images:
            from PIL import Image

            images = [Image.open(path).convert("RGB") for path in settings.caption_images]
            captions = pipeline.caption(
                images, length=t5.max_length, num_inference_steps=settings.caption_steps, generator=generator, **size
            ).texts
        self.engine.train()
        if not self.ctx.is_main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name, images in outputs.items():
            grid = image_grid(images, columns=min(4, len(images)))
            grid.save(folder / f"{name}.png")
            writer.add_image(f"samples/{name}", np.asarray(grid), self.step, dataformats="HWC")
        if captions:
            text = "\n".join(
                f"{path}: {caption}" for path, caption in zip(settings.caption_images, captions, strict=True)
            )
            (folder / "captions.txt").write_text(text + "\n")
            writer.add_text("samples/captions", text, self.step)
        logger.info("samples written to %s", folder)
