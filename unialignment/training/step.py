"""One optimizer step, as the trainer runs it and the benchmark times it.

Each micro-batch goes through the frozen components (or comes from the offline cache), the objective (image
stream, text stream, both alignments) and DeepSpeed's backward and step, which accumulates, clips, reduces and
applies the update at the last micro-step. Before that update the ranks agree whether any loss or gradient was not
finite, on every ZeRO stage (DeepSpeed's own overflow check does not run in fp32 without ZeRO); if so the update
is skipped. Then the EMA follows the applied weights, and the step's metrics are reduced over ranks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from unialignment.data.collate import RawBatch
from unialignment.data.features import TrainingBatch, prepare_training_batch
from unialignment.frozen.text_encoder import TokenizedText
from unialignment.training.builders import TrainingRig
from unialignment.training.distributed import all_reduce_sum
from unialignment.training.flops import training_flops_per_sample

logger = logging.getLogger("unialignment.train")


@dataclass
class StepResult:
    """applied: the update was applied (False: skipped, a non-finite loss or gradient on some rank). losses: each
    loss term, the mean over micro-batches and ranks. replaced_samples, truncated_texts, flops: sums over
    micro-batches and ranks (flops: model FLOPs of the step's samples, `unialignment.training.flops`)."""

    applied: bool
    group: int  # the task group every micro-batch of the step came from
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
    features the batch carries), drawing latents with the run's generator. With `speed.prefetch` the default
    draws every random number on the host ahead (`prepare_training_batch` with the objective's `draw`), and the
    loss scalars stay on the device until the step's one read."""
    prefetch = rig.config.speed.prefetch
    if prepare is None:

        def draw(latent_shape: torch.Size, caption: TokenizedText):
            return rig.objective.draw(
                latent_shape, caption.input_ids, caption.score_mask, caption.attention_mask, rig.generator
            )

        def prepare(raw: RawBatch) -> TrainingBatch:
            return prepare_training_batch(
                raw, rig.components, rig.generator, rig.ctx.device, rig.dtype, draw if prefetch else None
            )

    engine, model_config = rig.engine, rig.engine.module.config
    loss_sums: dict[str, float | torch.Tensor] = {}
    replaced = truncated = flops = 0
    nonfinite: bool | torch.Tensor = False
    batches = iter(micro_batches)
    for micro_step in range(rig.accumulation):
        raw = next(batches)
        batch = prepare(raw)
        losses = rig.objective(engine, batch, rig.generator)
        engine.backward(losses.total)
        if prefetch:  # device tensors: nothing is read until the step's decision below
            scalars = losses.detached()
            nonfinite = nonfinite | ~torch.isfinite(torch.stack(list(scalars.values()))).all()
        else:
            scalars = losses.scalars()
            nonfinite = nonfinite or not all(math.isfinite(value) for value in scalars.values())
        skip = False
        if micro_step == rig.accumulation - 1:  # the update comes with this step(): decide on it first
            nonfinite = skip = _any_rank_nonfinite(rig, nonfinite)
        with _skipped_update(engine) if skip else contextlib.nullcontext():
            engine.step()
        for name, value in scalars.items():
            loss_sums[name] = loss_sums.get(name, 0.0) + value
        replaced, truncated = replaced + len(raw.replaced), truncated + raw.num_truncated
        flops += batch_flops(model_config, batch)
    applied = engine.was_step_applied() and not nonfinite
    grad_norm = engine.get_global_grad_norm()
    if applied and grad_norm is not None and not math.isfinite(float(grad_norm)):
        raise RuntimeError(
            f"an update with gradient norm {float(grad_norm)} was applied; the weights are no longer finite. Resume "
            "from the last complete checkpoint with a lower learning rate."
        )
    if applied and rig.ema is not None:
        rig.ema.update()

    # One collective for the step: loss means (averaged over ranks below) and the counts, summed over all ranks.
    means = {name: total / rig.accumulation for name, total in loss_sums.items()}
    counts = {"_replaced": replaced, "_truncated": truncated, "_flops": flops}
    totals = all_reduce_sum({**means, **counts}, rig.ctx.device)
    counts = {name: totals.pop(name) for name in counts}
    return StepResult(
        applied=applied,
        group=raw.group,
        losses={name: total / rig.ctx.world_size for name, total in totals.items()},
        replaced_samples=int(counts["_replaced"]),
        truncated_texts=int(counts["_truncated"]),
        flops=counts["_flops"],
        grad_norm=None if grad_norm is None else float(grad_norm),
    )


def _any_rank_nonfinite(rig: TrainingRig, nonfinite: bool | torch.Tensor) -> bool:
    """Whether any rank saw a non-finite loss or holds a non-finite gradient, agreed by all ranks: the step's one
    read of the device. The gradients a rank holds in `.grad` are checked here (ZeRO 0, where DeepSpeed does not
    check them in fp32); the ZeRO stages keep them in DeepSpeed's partitions, which its own overflow check covers."""
    device = rig.ctx.device
    flags = [torch.as_tensor(nonfinite, device=device).reshape(1)]
    grads = [param.grad for param in rig.engine.module.parameters() if param.grad is not None]
    if grads:
        flags.append(~torch.stack([torch.isfinite(grad).all() for grad in grads]).all().reshape(1))
    return all_reduce_sum({"nonfinite": torch.cat(flags).any().double()}, device)["nonfinite"] > 0


@contextlib.contextmanager
def _skipped_update(engine):
    """Within the block the optimizer's step does nothing and reports an overflow, which DeepSpeed counts as a
    skipped step (no learning-rate step either, gradients cleared), as after its own fp16/bf16 overflow check. Only
    ZeRO 0 needs it: the ZeRO optimizers check their partitioned gradients themselves and skip."""
    optimizer = engine.optimizer
    if engine.zero_optimization():
        yield
        return
    had_overflow, overflow = hasattr(optimizer, "overflow"), getattr(optimizer, "overflow", None)
    optimizer.step, optimizer.overflow = (lambda *args, **kwargs: None), True
    try:
        yield
    finally:
        del optimizer.step  # the instance attribute goes; the class's step is seen again
        if had_overflow:
            optimizer.overflow = overflow
        else:
            del optimizer.overflow
