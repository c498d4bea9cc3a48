"""One optimizer step, as the trainer runs it and the benchmark times it.

Each micro-batch goes through the frozen components (or comes from the offline cache), the objective (image
stream, text stream, both alignments) and DeepSpeed's backward and step, which accumulates, clips, reduces and
applies the update at the last micro-step (and skips it when the gradient norm is not finite). Then the EMA
follows the applied weights, and the step's metrics are reduced over ranks in one collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from unialignment.data.collate import RawBatch
from unialignment.data.features import TrainingBatch, prepare_training_batch
from unialignment.training.builders import TrainingRig
from unialignment.training.distributed import all_reduce_sum
from unialignment.training.flops import training_flops_per_sample

logger = logging.getLogger("unialignment.train")


@dataclass
class StepResult:
    """applied: DeepSpeed applied the update (False: skipped, a non-finite gradient norm). losses: each loss term,
    the mean over micro-batches and ranks. replaced_samples, truncated_texts, flops: sums over micro-batches and
    ranks (flops: model FLOPs of the step's samples, `unialignment.training.flops`)."""

    applied: bool
    losses: dict[str, float]
    replaced_samples: int
    truncated_texts: int
    flops: float
    grad_norm: float | None


def batch_flops(model_config, batch: TrainingBatch) -> int:
    """Model FLOPs of training on `batch`: its samples' token counts through `training_flops_per_sample`."""

    def tokens(latents) -> int:
        return latents.shape[-2] * latents.shape[-1] // model_config.patch_size**2

    condition_tokens = sum(tokens(latents) for latents in batch.condition_latents or [])
    per_sample = training_flops_per_sample(
        model_config, tokens(batch.target_latents), batch.caption_ids.shape[1], condition_tokens
    )
    return per_sample * batch.target_latents.shape[0]


def optimizer_step(
    rig: TrainingRig,
    micro_batches: Iterable[RawBatch],
    prepare: Callable[[RawBatch], TrainingBatch] | None = None,
) -> StepResult:
    """Run the `rig.accumulation` micro-batches of `micro_batches` through one optimizer step.

    `prepare` turns a raw batch into the objective's batch; by default the frozen components (or the cached
    features the batch carries), drawing latents with the run's generator."""
    if prepare is None:

        def prepare(raw: RawBatch) -> TrainingBatch:
            return prepare_training_batch(raw, rig.components, rig.generator, rig.ctx.device, rig.dtype)

    engine, model_config = rig.engine, rig.engine.module.config
    loss_sums: dict[str, float] = {}
    replaced = truncated = flops = 0
    batches = iter(micro_batches)
    for _ in range(rig.accumulation):
        raw = next(batches)
        batch = prepare(raw)
        losses = rig.objective(engine, batch, rig.generator)
        engine.backward(losses.total)
        engine.step()
        for name, value in losses.scalars().items():
            loss_sums[name] = loss_sums.get(name, 0.0) + value
        replaced, truncated = replaced + len(raw.replaced), truncated + raw.num_truncated
        flops += batch_flops(model_config, batch)
    applied = engine.was_step_applied()
    if applied and rig.ema is not None:
        rig.ema.update()

    # One collective for the step: loss means (averaged over ranks below) and the counts, summed over all ranks.
    means = {name: total / rig.accumulation for name, total in loss_sums.items()}
    counts = {"_replaced": replaced, "_truncated": truncated, "_flops": flops}
    totals = all_reduce_sum({**means, **counts}, rig.ctx.device)
    counts = {name: totals.pop(name) for name in counts}
    grad_norm = engine.get_global_grad_norm()
    return StepResult(
        applied=applied,
        losses={name: total / rig.ctx.world_size for name, total in totals.items()},
        replaced_samples=int(counts["_replaced"]),
        truncated_texts=int(counts["_truncated"]),
        flops=counts["_flops"],
        grad_norm=None if grad_norm is None else float(grad_norm),
    )
