"""Task mixing: the step's task, sharding across ranks without repeats, and exact resume."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from unialignment.data.sampler import TaskMixingSampler


def _steps(sampler, count):
    out = []
    for _ in range(count):
        group, micro_batches = sampler.next_step()
        out.append((group, [[(key.group, key.index) for key in batch] for batch in micro_batches]))
    return out


def test_alternate_schedule_follows_the_weights_exactly():
    one_to_one = TaskMixingSampler([10, 10], [1, 1], micro_batch_size=2)
    assert [group for group, _ in _steps(one_to_one, 6)] == [0, 1, 0, 1, 0, 1]
    two_to_one = TaskMixingSampler([10, 10], [2, 1], micro_batch_size=2)
    groups = [group for group, _ in _steps(two_to_one, 30)]
    assert Counter(groups) == {0: 20, 1: 10}
    assert all(Counter(groups[i : i + 3]) == {0: 2, 1: 1} for i in range(0, 30, 3))


def test_random_schedule_draws_by_weight_and_is_seeded():
    groups = [g for g, _ in _steps(TaskMixingSampler([5, 5, 5], [0.5, 0.3, 0.2], 1, schedule="random"), 4000)]
    frequencies = Counter(groups)
    for group, weight in enumerate([0.5, 0.3, 0.2]):
        assert abs(frequencies[group] / 4000 - weight) < 0.03
    again = [g for g, _ in _steps(TaskMixingSampler([5, 5, 5], [0.5, 0.3, 0.2], 1, schedule="random"), 4000)]
    assert groups == again


def test_two_ranks_share_the_task_and_split_each_epoch_without_repeats():
    sizes, micro, accumulation = [24, 16], 2, 2
    ranks = [TaskMixingSampler(sizes, [1, 1], micro, accumulation, rank=r, world_size=2, seed=3) for r in range(2)]
    per_rank = [_steps(sampler, 6) for sampler in ranks]
    seen = {0: [], 1: []}
    for (group_a, batches_a), (group_b, batches_b) in zip(*per_rank, strict=True):
        assert group_a == group_b
        assert all(len(batch) == micro for batch in batches_a) and len(batches_a) == accumulation
        for batch in batches_a + batches_b:
            seen[group_a].extend(index for _, index in batch)
    # 3 steps x 8 samples = 24: exactly one epoch of group 0; 24 samples of group 1 = 1.5 epochs.
    assert sorted(seen[0]) == list(range(24))
    assert sorted(seen[1][:16]) == list(range(16)) and len(set(seen[1][16:])) == 8


def test_resume_from_a_saved_state_gives_the_same_batches():
    def make():
        return TaskMixingSampler([7, 11, 5], [2, 1, 1], 3, 2, rank=1, world_size=2, seed=9)

    uninterrupted = _steps(make(), 20)
    first = make()
    part_one = _steps(first, 10)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert part_one + _steps(resumed, 10) == uninterrupted


def test_state_for_a_step_behind_a_prefetching_loader():
    def make():
        return TaskMixingSampler([7, 11], [1, 1], 2, seed=1, schedule="random")

    uninterrupted = _steps(make(), 12)
    ahead = make()
    _steps(ahead, 9)  # a DataLoader prefetched up to step 9; training consumed 6
    resumed = make()
    resumed.load_state_dict(ahead.state_dict(next_step=6))
    assert _steps(resumed, 6) == uninterrupted[6:]
    with pytest.raises(KeyError, match="step 50"):
        ahead.state_dict(next_step=50)


def test_a_changed_mixture_cannot_resume_silently():
    state = TaskMixingSampler([7, 11], [1, 1], 2).state_dict()
    with pytest.raises(ValueError, match="pool_sizes"):
        TaskMixingSampler([7, 12], [1, 1], 2).load_state_dict(state)
    with pytest.raises(ValueError, match="schedule"):
        TaskMixingSampler([7, 11], [1, 1], 2, schedule="random").load_state_dict(state)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="one weight per task group"):
        TaskMixingSampler([3, 3], [1], 1)
    with pytest.raises(ValueError, match=r"every task group \(and bucket\) needs samples"):
        TaskMixingSampler([3, 0], [1, 1], 1)
    with pytest.raises(ValueError, match="schedule"):
        TaskMixingSampler([3], [1], 1, schedule="zigzag")


class _KeyEcho(Dataset):
    def __getitem__(self, key):
        return torch.tensor([key.group, key.index, key.step, key.micro_step])


def test_dataloader_workers_keep_the_order_and_the_keys():
    sampler = TaskMixingSampler([9, 9], [1, 1], 3, 2, num_steps=5, seed=2)
    expected = _steps(TaskMixingSampler([9, 9], [1, 1], 3, 2, seed=2), 5)
    loader = DataLoader(_KeyEcho(), batch_sampler=sampler, num_workers=2)
    batches = [batch.tolist() for batch in loader]
    assert len(batches) == len(TaskMixingSampler([9, 9], [1, 1], 3, 2, num_steps=5)) == 10
    flat_expected = [[(group, index) for group, index in batch] for _, step in expected for batch in step]
    assert [[(row[0], row[1]) for row in batch] for batch in batches] == flat_expected
    assert [batch[0][2] for batch in batches] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_bucket_pools_keep_each_batch_in_one_bucket():
    # Group 0 has two aspect-ratio buckets of 6 and 2 samples; group 1 has one pool.
    sampler = TaskMixingSampler([[6, 2], 4], [1, 1], micro_batch_size=2, seed=4)
    seen = Counter()
    for _ in range(800):
        group, micro_batches = sampler.next_step()
        (batch,) = micro_batches
        assert len({(key.group, key.bucket) for key in batch}) == 1
        seen.update((key.group, key.bucket) for key in batch)
    # Buckets are drawn in proportion to their size: about 3:1 within group 0.
    assert 2.5 < seen[(0, 0)] / seen[(0, 1)] < 3.6
    state = sampler.state_dict()
    assert state["pool_sizes"] == [[6, 2], [4]] and len(state["cursors"][0]) == 2
