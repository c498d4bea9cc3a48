"""The UniAlignment trainer: DeepSpeed around the transformer, frozen components beside it, one task per step.

The trainer is a short loop: data, `optimizer_step` (unialignment/training/step.py, which the benchmark times too),
log, sample, checkpoint. What the run is built from (transformer, DeepSpeed, schedule, EMA, objective) comes from
unialignment/training/builders.py. DeepSpeed skips a step whose gradient norm is not finite; the trainer counts
such steps and stops after `max_nonfinite_in_a_row` of them. Checkpoints hold everything an exact resume needs;
exports are ordinary `from_pretrained` folders. Only rank 0 logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from mmengine.config import Config
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from unialignment.data.collate import Collator, RawBatch
from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
from unialignment.data.feature_cache import components_fingerprint
from unialignment.data.sampler import TaskMixingSampler
from unialignment.errors import UserError
from unialignment.files import atomic_path
from unialignment.frozen.components import load_frozen_components
from unialignment.training import checkpoint as ckpt
from unialignment.training.builders import build_training, seed_run
from unialignment.training.config import TrainConfig
from unialignment.training.distributed import init_distributed
from unialignment.training.metrics_log import MetricsLog, run_header
from unialignment.training.preflight import check_image_sides
from unialignment.training.samples import sample_grids, sample_outputs, sampling_model, write_samples
from unialignment.training.step import StepResult, optimizer_step
from unialignment.training.validation import Validation

logger = logging.getLogger("unialignment.train")


class CheckpointWriteError(UserError):
    """A checkpoint that could not be written; the message names it, where, and the last complete one."""


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.ctx = init_distributed(config.distributed_timeout_minutes)
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
        validation = config.validation
        self.validation = (
            Validation(self.rig, self.rig.size_multiple) if validation.every_steps and validation.groups else None
        )
        self.step, self.skipped_steps, self.nonfinite_in_a_row, self.data_seconds = 0, 0, 0, 0.0
        self._resume()

    # --- set-up ----------------------------------------------------------------------------------------------

    def _set_up_run_folder(self) -> None:
        if self.ctx.is_main:
            try:
                self.work_dir.mkdir(parents=True, exist_ok=True)
                # The merged, checked config, so a run folder says exactly what ran: as JSON for whatever reads the
                # run folder later (data, never executed), and as the mmengine file a user can start from.
                with atomic_path(self.work_dir / "config.json") as temporary:
                    temporary.write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
                Config(self.config.to_dict()).dump(str(self.work_dir / "config.py"))
                handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(self.work_dir / "train.log")]
            except OSError as error:
                raise UserError(f"work_dir: the run folder {self.work_dir} cannot be written: {error}") from None
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
        max_side = self.rig.engine.module.config.pos_embed_max_size * self.rig.size_multiple
        check_image_sides(
            config, [side for group in self.groups for bucket in group.pool_buckets for side in bucket], max_side
        )
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
            uint8_pixels=config.speed.uint8_pixels,
            draft_decode=data.draft_decode,
        )
        teacher = self.components.teacher
        in_workers = teacher is not None and config.speed.teacher_inputs_in_workers
        teacher_inputs = teacher.input_preparer() if in_workers else None
        self.collator = Collator(self.components.t5.tokenizer, self.components.t5.max_length, teacher_inputs)

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
        saved_world_size = ckpt.saved_world_size(folder)
        if saved_world_size == self.ctx.world_size:
            _, client_state = self.rig.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        else:
            client_state = self._load_resharded(folder, saved_world_size)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}")
        state = client_state["unialignment"]
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.sampler.load_state_dict(state["sampler"])
        if self.ctx.rank < saved_world_size:
            rank_state = ckpt.load_rank_state(folder, self.ctx.rank)
            ckpt.restore_rng_state(rank_state["rng"], self.rig.generator)
            self.nonfinite_in_a_row = rank_state["nonfinite_in_a_row"]
        else:  # a rank the checkpoint did not have: random states of its own, from the seed and the step
            ckpt.seed_new_rank(self.config.seed, self.step, self.ctx.rank, self.rig.generator)
            rank_state = None
        if self.rig.ema is not None:
            if (folder / ckpt.EMA_FILE).is_file():
                self.rig.ema.load_full(load_file(folder / ckpt.EMA_FILE))
            elif rank_state is not None and saved_world_size == self.ctx.world_size:
                self.rig.ema.load_state_dict(rank_state["ema"])  # written before the whole EMA was stored
            else:
                raise RuntimeError(f"{folder} holds no {ckpt.EMA_FILE}: it can only resume on {saved_world_size} ranks")
        logger.info("resumed from %s at step %d", folder, self.step)

    def _load_resharded(self, folder: Path, saved_world_size: int) -> dict | None:
        """Load a checkpoint written by `saved_world_size` ranks onto this run's: ZeRO's partitioned optimizer state
        goes through DeepSpeed's universal checkpoint (converted once, by rank 0, into `<checkpoint>/universal`);
        without ZeRO every rank holds the whole state and loads it as it is. The sampler's state is global and the
        EMA is stored whole, so both carry over; the ranks' random draws start afresh (`seed_new_rank`)."""
        logger.warning(
            "resuming %d rank(s) from a checkpoint of %d: model, optimizer, schedule, EMA and data order continue; the "
            "ranks' random draws (noise, timesteps, masks) differ from those an unchanged run would have made",
            self.ctx.world_size, saved_world_size,
        )  # fmt: skip
        engine = self.rig.engine
        if self.config.deepspeed.zero_stage == 0:
            _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
            return client_state
        universal = folder / ckpt.UNIVERSAL
        if self.ctx.is_main:
            ckpt.convert_to_universal(folder)
        self.ctx.barrier()
        engine._config.load_universal_checkpoint = True  # DeepSpeed reads the flag from its config at load time
        try:
            _, client_state = engine.load_checkpoint(str(folder), tag=universal.name)
        finally:
            engine._config.load_universal_checkpoint = False
        return client_state

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
        try:
            self.rig.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
            # The whole EMA, gathered (a collective) and written once: any world size can take its shard from it.
            ema = self.rig.ema.gather() if self.rig.ema is not None else None
            if ema is not None:
                save_file(ema, root / tag / ckpt.EMA_FILE)
            rank_state = {"rng": ckpt.rng_state(self.rig.generator), "nonfinite_in_a_row": self.nonfinite_in_a_row}
            ckpt.save_rank_state(root / tag, self.ctx.rank, rank_state)
            self.ctx.barrier()
            if self.config.checkpoint.export:
                self.export(tag, ema)
        except (OSError, RuntimeError) as error:
            # torch.save reports a failed write as a RuntimeError from its zip writer ("[enforce fail at
            # inline_container.cc] ... file write failed" or "unexpected pos"): that is a write failure too.
            if isinstance(error, RuntimeError) and not any(
                clue in str(error) for clue in ("inline_container", "enforce fail", "writ")
            ):
                raise
            self._give_up_checkpoint(tag, error)
        self.ctx.barrier()
        if self.ctx.is_main:
            # `latest` first: the export links never point past the last complete checkpoint.
            ckpt.write_latest(self.work_dir, tag)
            ckpt.point_export(self.work_dir, tag)
            for removed in ckpt.prune_checkpoints(self.work_dir, self.config.checkpoint.keep_last):
                logger.info("removed old checkpoint %s (and its export)", removed)
            logger.info("checkpoint %s written", root / tag)
        self.ctx.barrier()

    def _give_up_checkpoint(self, tag: str, error: Exception) -> None:
        """A checkpoint that could not be written (a full disk, a read-only folder): remove what was written of it,
        so no resume can pick it, and stop with the paths and the last complete checkpoint."""
        if self.ctx.is_main:
            ckpt.remove_checkpoint(self.work_dir, tag)
        last = ckpt.latest_checkpoint(self.work_dir)
        raise CheckpointWriteError(
            f"checkpoint {tag} could not be written to {ckpt.checkpoint_root(self.work_dir) / tag}: {error}. "
            f"The last complete checkpoint is {last or 'none (no checkpoint was completed yet)'}; free space or fix "
            "the folder's permissions, then resume."
        ) from None

    def export(self, tag: str, ema: dict[str, torch.Tensor] | None) -> None:
        """`export/<tag>/raw` and `export/<tag>/ema` as transformer folders (LoRA runs: adapter weights only).
        `ema`: the gathered averages (on rank 0)."""
        engine = self.rig.engine
        raw = self._full_state_dict()
        if self.ctx.is_main:
            ckpt.export_weights(self.work_dir, tag, engine.module, raw, ema, lora=self.config.model.lora_rank > 0)

    # --- the loop --------------------------------------------------------------------------------------------

    def _micro_batches(self, batches: Iterator[RawBatch]) -> Iterator[RawBatch]:
        """The loader's batches of the current step, checked to belong to it; the time spent waiting for them is
        added to `self.data_seconds`."""
        for micro_step in range(self.rig.accumulation):
            waiting = time.perf_counter()
            raw = next(batches)
            self.data_seconds += time.perf_counter() - waiting
            if (raw.step, raw.micro_step) != (self.step, micro_step):
                raise RuntimeError(
                    f"data out of step: got step {raw.step}.{raw.micro_step}, training {self.step}.{micro_step}"
                )
            for failure in raw.replaced:
                logger.warning("replaced an unreadable sample: %s", failure)
            yield raw

    def train(self) -> None:
        config, settings = self.config, self.config.logging
        batches = iter(self._loader())
        self.rig.engine.train()
        log = MetricsLog(
            self.work_dir, self.ctx.is_main, config.max_steps, self.step, settings.every_steps, settings.tracker,
            config.to_dict(),
        )  # fmt: skip
        with log:
            header = run_header(config, self.ctx.world_size, self.rig.accumulation, self.work_dir / "config.json")
            logger.info("%s", header)
            log.text("run/header", header, self.step)
            if self.step == 0 and settings.sample_every_steps:
                self.log_samples(log)  # the untrained baseline every later grid compares with
            while self.step < config.max_steps:
                started, self.data_seconds = time.perf_counter(), 0.0
                if self.ctx.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.ctx.device)
                result = optimizer_step(self.rig, self._micro_batches(batches))
                self._count_skipped(result)
                self.step += 1
                log.write(self.step, self._record(result, time.perf_counter() - started))
                self._periodic(log)

    def _periodic(self, log: MetricsLog) -> None:
        """What happens after a step: the stop on too many non-finite steps, samples, validation, checkpoints."""
        config, every = self.config, self.config.logging.sample_every_steps
        if self.nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or gradient; stopping. The "
                f"last complete checkpoint is {ckpt.latest_checkpoint(self.work_dir)}; lower the learning rate or "
                "check the data before resuming."
            )
        if every and self.step % every == 0:
            self.log_samples(log)
        if self.validation is not None and self.step % config.validation.every_steps == 0:
            record = self.validation.run()
            log.scalars(record, self.step)
            logger.info("step %d validation %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in record.items()))
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
        """The step's scalars: every loss term in total and for the step's task group (`loss/image/t2i`, so that
        alternating groups give smooth curves), the schedule, the counts, time waiting for data against time
        computing, throughput, and on GPUs memory and MFU."""
        group = self.groups[result.group].name
        record = {
            **{f"loss/{name}": value for name, value in result.losses.items()},
            **{f"loss/{name}/{group}": value for name, value in result.losses.items()},
            "lr": self.rig.lr_scheduler.get_last_lr()[0],
            "samples_per_s": self.config.batch.global_batch_size / elapsed,
            "time/step_s": elapsed,
            "time/data_s": self.data_seconds,
            "replaced_samples": result.replaced_samples,
            "truncated_texts": result.truncated_texts,
            "skipped_steps": self.skipped_steps,
        }
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        if self.ctx.device.type == "cuda":
            peak = self.config.logging.peak_tflops * 1e12 * self.ctx.world_size
            record["mfu"] = result.flops / elapsed / peak
            record["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
            record["memory/reserved_gib"] = torch.cuda.memory_reserved(self.ctx.device) / 2**30
        return record

    def log_samples(self, log: MetricsLog) -> None:
        """Labelled sample grids from the EMA (or raw) weights into the run folder and the tracker. The weights are
        gathered by every rank (collectives); rank 0 samples and writes."""
        engine, ema = self.rig.engine, self.rig.ema
        raw = self._full_state_dict()
        use_ema = self.config.logging.sample_weights == "ema" and ema is not None
        averaged = ema.gather() if use_ema else None
        if self.ctx.is_main:
            model = sampling_model(engine.module, raw, averaged, self.ctx.device)
            outputs, captions = sample_outputs(model, self.components, self.config)
            del model
            grids = sample_grids(self.config, outputs, captions)
            folder = self.work_dir / "samples" / ckpt.tag_for_step(self.step)
            write_samples(folder, grids, captions, self.config.logging.caption_images)
            for name, grid in grids.items():
                log.image(f"samples/{name}", grid, self.step)
        self.ctx.barrier()

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The transformer's whole state on rank 0 (None elsewhere); under ZeRO-3 a collective."""
        engine = self.rig.engine
        if self.config.deepspeed.zero_stage == 3:
            return engine._zero3_consolidated_16bit_state_dict()
        return engine.module.state_dict() if self.ctx.is_main else None
