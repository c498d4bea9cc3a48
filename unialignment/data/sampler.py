"""Task mixing: every optimizer step takes one task, and every rank gets a batch of that task.

The reference alternates text-to-image and edit steps 1:1 (docs/METHOD.md section 6). Here a stage lists task groups
(a group is one or more datasets whose records batch together, e.g. editing and perception) with weights;
the step's group is chosen either by a deterministic weighted round robin ("alternate", the reference) or
by a seeded weighted draw ("random").

With aspect-ratio buckets a group is split into one pool per bucket (a batch shares one image size); the
step's bucket is a seeded draw weighted by pool size. Within a pool, samples follow one permutation per epoch,
drawn from (seed, group, bucket, epoch). A step uses the next `world_size x batch_per_rank` positions of its
pool's stream, rank r taking the r-th contiguous slice,
so no sample repeats within an epoch across ranks and DataLoader workers (the DataLoader hands whole
micro-batches to workers). Everything is a function of the seed and the step counter, and the state is the
per-pool cursor; resuming from a saved state yields exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from unialignment.errors import UserError

SCHEDULES = ("alternate", "random")


@dataclass(frozen=True)
class SampleKey:
    """What the sampler hands the dataset: sample `index` of a group's bucket pool, and its step and micro-step."""

    group: int
    bucket: int
    index: int
    step: int
    micro_step: int


class TaskMixingSampler:
    """A batch sampler (for `DataLoader(batch_sampler=...)`) yielding one micro-batch of `SampleKey`s at a time.

    Args:
        group_sizes: number of samples in each task group, or per group a list of its bucket pools' sizes.
        group_weights: relative frequency of each group's steps.
        micro_batch_size: samples per micro-batch on one rank.
        gradient_accumulation_steps: micro-batches per optimizer step on one rank.
        rank, world_size: this process's place among the data-parallel ranks.
        seed: the only source of randomness.
        schedule: "alternate" (deterministic weighted round robin) or "random" (seeded weighted draw).
        num_steps: optimizer steps to yield in total (the iterator stops there); None for endless.
    """

    def __init__(
        self,
        group_sizes: Sequence[int | Sequence[int]],
        group_weights: Sequence[float],
        micro_batch_size: int,
        gradient_accumulation_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        schedule: str = "alternate",
        num_steps: int | None = None,
    ):
        if len(group_sizes) != len(group_weights) or not group_sizes:
            raise ValueError(
                f"need one weight per task group, got sizes {list(group_sizes)} and weights {list(group_weights)}"
            )
        pool_sizes = [[int(n)] if np.isscalar(n) else [int(m) for m in n] for n in group_sizes]
        if any(not pools or any(size <= 0 for size in pools) for pools in pool_sizes):
            raise ValueError(f"every task group (and bucket) needs samples; sizes are {pool_sizes}")
        if any(weight < 0 for weight in group_weights) or sum(group_weights) <= 0:
            raise ValueError(f"task weights must be non-negative with a positive sum, got {list(group_weights)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.pool_sizes = pool_sizes
        self.group_weights = np.asarray(group_weights, dtype=np.float64) / float(sum(group_weights))
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.rank, self.world_size = rank, world_size
        self.seed, self.schedule, self.num_steps = seed, schedule, num_steps

        # Where the next step starts: its number and each pool's position in its endless stream.
        self.step = 0
        self.cursors = [[0] * len(pools) for pools in pool_sizes]
        self._round_robin_credit = np.zeros(len(pool_sizes))
        # States at the start of recently yielded steps: a DataLoader prefetches ahead of training, so the
        # state to save is the one of the first step training has not consumed, which may lie behind.
        self._recent_states: OrderedDict[int, dict] = OrderedDict()
        self._permutation_cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    @property
    def samples_per_rank(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def samples_per_step(self) -> int:
        return self.samples_per_rank * self.world_size

    def _draw(self, step: int, stream: int, weights: np.ndarray) -> int:
        """A weighted choice that is a pure function of (seed, stream, step)."""
        uniform = np.random.default_rng([self.seed, stream, step]).random()
        return int(min(np.searchsorted(np.cumsum(weights), uniform * weights.sum(), side="right"), len(weights) - 1))

    def _next_group(self) -> int:
        if self.schedule == "random":
            return self._draw(self.step, 0x7A5C, self.group_weights)
        # Smooth weighted round robin: exact proportions, the heaviest group first, no randomness.
        self._round_robin_credit += self.group_weights
        group = int(np.argmax(self._round_robin_credit))
        self._round_robin_credit[group] -= 1.0
        return group

    def _permutation(self, group: int, bucket: int, epoch: int) -> np.ndarray:
        key = (group, bucket, epoch)
        if key not in self._permutation_cache:
            if len(self._permutation_cache) >= 64:
                self._permutation_cache.popitem(last=False)
            rng = np.random.default_rng([self.seed, 0x5A3E, group, bucket, epoch])
            self._permutation_cache[key] = rng.permutation(self.pool_sizes[group][bucket])
        return self._permutation_cache[key]

    def _indices(self, group: int, bucket: int, start: int, count: int) -> list[int]:
        """Samples at positions [start, start + count) of a pool's stream of epoch permutations."""
        size = self.pool_sizes[group][bucket]
        return [int(self._permutation(group, bucket, p // size)[p % size]) for p in range(start, start + count)]

    def _snapshot(self) -> dict:
        return {
            "step": self.step,
            "cursors": [list(pool_cursors) for pool_cursors in self.cursors],
            "round_robin_credit": self._round_robin_credit.tolist(),
        }

    def next_step(self) -> tuple[int, list[list[SampleKey]]]:
        """Advance one optimizer step: (task group, this rank's micro-batches of SampleKeys)."""
        self._recent_states[self.step] = self._snapshot()
        while len(self._recent_states) > 4096:
            self._recent_states.popitem(last=False)
        group = self._next_group()
        pools = self.pool_sizes[group]
        bucket = self._draw(self.step, 0xB0C7, np.asarray(pools, dtype=np.float64)) if len(pools) > 1 else 0
        start = self.cursors[group][bucket] + self.rank * self.samples_per_rank
        indices = self._indices(group, bucket, start, self.samples_per_rank)
        size = self.micro_batch_size
        micro_batches = [
            [SampleKey(group, bucket, index, self.step, micro) for index in indices[micro * size : (micro + 1) * size]]
            for micro in range(self.gradient_accumulation_steps)
        ]
        self.cursors[group][bucket] += self.samples_per_step
        self.step += 1
        return group, micro_batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        while self.num_steps is None or self.step < self.num_steps:
            _, micro_batches = self.next_step()
            yield from micro_batches

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless sampler (num_steps=None) has no length")
        return max(0, self.num_steps - self.step) * self.gradient_accumulation_steps

    def epoch(self, group: int) -> float:
        """How many passes over a group the run has made (fractional)."""
        return sum(self.cursors[group]) / sum(self.pool_sizes[group])

    # --- state -------------------------------------------------------------------------------------------------

    def state_dict(self, next_step: int | None = None) -> dict:
        """The state from which `next_step` (default: the next step this sampler would yield) is the first
        step yielded. Pass the number of optimizer steps training has consumed so prefetching is undone."""
        if next_step is None or next_step == self.step:
            snapshot = self._snapshot()
        elif next_step in self._recent_states:
            snapshot = dict(self._recent_states[next_step])
        else:
            raise KeyError(f"no sampler state kept for step {next_step} (current step {self.step})")
        return {
            **snapshot,
            "seed": self.seed,
            "schedule": self.schedule,
            "samples_per_step": self.samples_per_step,
            "pool_sizes": [list(pools) for pools in self.pool_sizes],
            "group_weights": self.group_weights.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state. The data (group sizes), weights, seed and schedule must match the saved run: a
        different mixture would silently give other batches, so it is an error naming what changed. The state
        holds global positions, so it does not depend on the world size: another number of ranks continues the
        epoch without repeating or skipping a sample, as long as the global batch is the same."""
        saved = state.get("samples_per_step", self.samples_per_step)  # states written before it was recorded
        if saved != self.samples_per_step:
            raise UserError(
                f"the checkpoint was trained with a global batch of {saved} samples per step, this run has "
                f"{self.samples_per_step}: resuming would shift the data order. Keep batch.global_batch_size (a "
                "different world size is fine; micro-batch x accumulation x ranks must give the same product)"
            )
        for key, current in (
            ("seed", self.seed),
            ("schedule", self.schedule),
            ("pool_sizes", [list(pools) for pools in self.pool_sizes]),
            ("group_weights", self.group_weights.tolist()),
        ):
            if state[key] != current and not (key == "group_weights" and np.allclose(state[key], current)):
                raise UserError(f"sampler state was saved with {key}={state[key]}, this run has {key}={current}")
        self.step = int(state["step"])
        self.cursors = [[int(cursor) for cursor in pool_cursors] for pool_cursors in state["cursors"]]
        self._round_robin_credit = np.asarray(state["round_robin_credit"], dtype=np.float64)
        self._recent_states.clear()
