"""A validation loss on a small fixed held-out set, comparable across runs and free of sampling noise.

The set is the first `validation.samples_per_group` records of each group of `validation.groups`, in order; batch b
draws its latents, timesteps, noise, condition dropout and text masks from a generator seeded by
`validation.seed + b` alone, so the same weights give the same loss every time, whatever the run's state. Every rank
computes every batch (the set is small, and under ZeRO-3 the ranks must run their forwards together).
"""

from __future__ import annotations

import torch

from unialignment.data.collate import Collator
from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
from unialignment.data.features import prepare_training_batch
from unialignment.data.sampler import SampleKey
from unialignment.training.builders import TrainingRig


class Validation:
    def __init__(self, rig: TrainingRig, size_multiple: int):
        config = rig.config
        self.rig, self.settings = rig, config.validation
        self.groups = build_task_groups(
            self.settings.groups,
            config.data.resolution,
            check_images=config.data.check_images,
            max_bad_fraction=config.data.max_bad_fraction,
            progress=False,
            size_multiple=size_multiple,
        )
        self.dataset = UniAlignmentDataset(self.groups, max_attempts=1)
        self.collator = Collator(rig.components.t5.tokenizer, rig.components.t5.max_length)
        self.batches = [keys for number in range(len(self.groups)) for keys in self._batches_of(number)]

    def _batches_of(self, group_number: int) -> list[list[SampleKey]]:
        """The group's first records (its first bucket pool, in order), in micro-batches of the run's size."""
        group = self.groups[group_number]
        count = min(self.settings.samples_per_group, group.pool_sizes[0])
        keys = [SampleKey(group_number, 0, index, 0, 0) for index in range(count)]
        size = self.rig.config.batch.micro_batch_size
        return [keys[start : start + size] for start in range(0, count, size)]

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        """`val/loss/<term>` over the whole set and `val/loss/<term>/<group>` per group (means over samples)."""
        rig, engine = self.rig, self.rig.engine
        sums: dict[str, dict[str, float]] = {}
        counts: dict[str, int] = {}
        engine.eval()
        for number, keys in enumerate(self.batches):
            generator = torch.Generator().manual_seed(self.settings.seed + number)
            raw = self.collator([self.dataset[key] for key in keys])
            batch = prepare_training_batch(raw, rig.components, generator, rig.ctx.device, rig.dtype)
            losses = rig.objective(engine, batch, generator).scalars()
            group = self.groups[keys[0].group].name
            for name, value in losses.items():
                sums.setdefault(group, {}).setdefault(name, 0.0)
                sums[group][name] += value * len(keys)
            counts[group] = counts.get(group, 0) + len(keys)
        engine.train()
        record = {}
        for name in next(iter(sums.values()), {}):
            total = sum(group_sums[name] for group_sums in sums.values())
            record[f"val/loss/{name}"] = total / sum(counts.values())
            for group, group_sums in sums.items():
                record[f"val/loss/{name}/{group}"] = group_sums[name] / counts[group]
        return record
