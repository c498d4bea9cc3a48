"""The UniAlignment trainer: DeepSpeed around the transformer, frozen components beside it, one task per step.

The trainer is a short loop: data, `optimizer_step` (unialignment/training/step.py, which the benchmark times too),
log, sample, checkpoint. What the run is built from (transformer, DeepSpeed, schedule, EMA, objective) comes from
unialignment/training/builders.py. DeepSpeed skips a step whose gradient norm is not finite; the trainer counts
such steps and stops after `max_nonfinite_in_a_row` of them. Checkpoints hold everything an exact resume needs;
exports are ordinary `from_pretrained` folders. Only rank 0 logs.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from mmengine.config import Config
from torch.utils.data import DataLoader

from unialignment.data.collate import Collator, RawBatch
from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
from unialignment.data.feature_cache import components_fingerprint
from unialignment.data.sampler import TaskMixingSampler
from unialignment.frozen.components import load_frozen_components
from unialignment.training import checkpoint as ckpt
from unialignment.training.builders import build_training, seed_run
from unialignment.training.config import TrainConfig
from unialignment.training.distributed import init_distributed
from unialignment.training.metrics_log import MetricsLog
from unialignment.training.samples import sample_outputs, write_samples
from unialignment.training.step import StepResult, optimizer_step

logger = logging.getLogger("unialignment.train")


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.ctx = init_distributed()
        self.work_dir = Path(config.work_dir)
        self._set_up_run_folder()
        if self.ctx.device.type == "cpu":
            # As weights settle, tiny (denormal) floats appear and slow every CPU matmul that meets them; flushing
            # them to zero made the toy stages 8-15% faster on 2 cores, with no effect on GPUs.
            torch.set_flush_denormal(True)
        generator = seed_run(config, self.ctx.rank)
        self.components = load_frozen_components(config.components, self.ctx.device)
        self.rig, source = build_training(config, self.components, self.ctx, generator)
        logger.info("transformer: %s", source)
        trainable = sum(p.numel() for p in self.rig.engine.module.parameters() if p.requires_grad)
        logger.info("trainable parameters: %.3f M", trainable / 1e6)
        self._build_data()
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
                    size_multiple=self.rig.size_multiple,
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
            self.rig.accumulation,
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
        _, client_state = self.rig.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
        state = client_state["unialignment"]
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.sampler.load_state_dict(state["sampler"])
        rank_state = ckpt.load_rank_state(folder, self.ctx.rank)
        ckpt.restore_rng_state(rank_state["rng"], self.rig.generator)
        self.nonfinite_in_a_row = rank_state["nonfinite_in_a_row"]
        if self.rig.ema is not None:
            self.rig.ema.load_state_dict(rank_state["ema"])
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
        self.rig.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        ema = self.rig.ema
        rank_state = {
            "ema": ema.state_dict() if ema is not None else {},
            "rng": ckpt.rng_state(self.rig.generator),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }
        ckpt.save_rank_state(root / tag, self.ctx.rank, rank_state)
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

    def export(self, tag: str) -> None:
        """`export/<tag>/raw` and `export/<tag>/ema` as transformer folders (LoRA runs: adapter weights only)."""
        engine = self.rig.engine
        if self.config.deepspeed.zero_stage == 3:
            raw = engine._zero3_consolidated_16bit_state_dict()  # a collective; the full dict on rank 0
        else:
            raw = engine.module.state_dict() if self.ctx.is_main else None
        ema = self.rig.ema.gather() if self.rig.ema is not None else None  # a collective too
        if self.ctx.is_main:
            ckpt.export_weights(self.work_dir, tag, engine.module, raw, ema, lora=self.config.model.lora_rank > 0)

    # --- the loop --------------------------------------------------------------------------------------------

    def _micro_batches(self, batches: Iterator[RawBatch]) -> Iterator[RawBatch]:
        """The loader's batches of the current step, checked to belong to it."""
        for micro_step in range(self.rig.accumulation):
            raw = next(batches)
            if (raw.step, raw.micro_step) != (self.step, micro_step):
                raise RuntimeError(
                    f"data out of step: got step {raw.step}.{raw.micro_step}, training {self.step}.{micro_step}"
                )
            for failure in raw.replaced:
                logger.warning("replaced an unreadable sample: %s", failure)
            yield raw

    def train(self) -> None:
        config = self.config
        batches = iter(self._loader())
        self.rig.engine.train()
        log_settings = config.logging
        with MetricsLog(self.work_dir, self.ctx.is_main, config.max_steps, self.step, log_settings.every_steps) as log:
            while self.step < config.max_steps:
                started = time.perf_counter()
                result = optimizer_step(self.rig, self._micro_batches(batches))
                self._count_skipped(result)
                self.step += 1
                log.write(self.step, self._record(result, time.perf_counter() - started))
                if self.nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
                    raise RuntimeError(
                        f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient; "
                        f"stopping. The last complete checkpoint is {ckpt.latest_checkpoint(self.work_dir)}; lower "
                        "the learning rate or check the data before resuming."
                    )
                if log_settings.sample_every_steps and self.step % log_settings.sample_every_steps == 0:
                    self.log_samples(log.writer)
                if self.step % config.checkpoint.every_steps == 0 or self.step == config.max_steps:
                    self.save_checkpoint()

    def _count_skipped(self, result: StepResult) -> None:
        if result.applied:
            self.nonfinite_in_a_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        logger.warning("step %d skipped: non-finite loss or gradient (%d in a row)", self.step, self.nonfinite_in_a_row)

    def _record(self, result: StepResult, elapsed: float) -> dict[str, float]:
        """The step's scalars for `metrics.jsonl` and TensorBoard."""
        record = {
            **{f"loss/{name}": value for name, value in result.losses.items()},
            "lr": self.rig.lr_scheduler.get_last_lr()[0],
            "samples_per_s": self.config.batch.global_batch_size / elapsed,
            "replaced_samples": result.replaced_samples,
            "truncated_texts": result.truncated_texts,
            "skipped_steps": self.skipped_steps,
        }
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        if self.ctx.device.type == "cuda":
            peak = self.config.logging.peak_tflops * 1e12 * self.ctx.world_size
            record["mfu"] = result.flops / elapsed / peak
        return record

    def log_samples(self, writer) -> None:
        """Samples into the run folder and TensorBoard. Under ZeRO-3 every rank takes part; rank 0 writes."""
        if self.config.deepspeed.zero_stage != 3 and not self.ctx.is_main:
            return
        outputs, captions = sample_outputs(self.rig)
        if self.ctx.is_main:
            folder = self.work_dir / "samples" / ckpt.tag_for_step(self.step)
            write_samples(folder, outputs, captions, self.config.logging.caption_images, writer, self.step)
