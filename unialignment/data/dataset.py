"""Datasets of a training stage: task groups of indexed JSONL files, read lazily, images prepared per sample.

A stage lists task groups (for example text-to-image; editing + perception), each with a weight and its JSONL
files. `build_task_groups` indexes and validates every file once (cached beside the data), reports the bad
lines and stops when too many are bad. `UniAlignmentDataset` turns the sampler's `SampleKey`s into `Sample`s:
an image that fails to decode is replaced by another sample of the same group, chosen deterministically, and
the replacement is recorded in the sample so the trainer counts and logs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from unialignment.data.feature_cache import REBUILD, FeatureCacheReader, image_stamp
from unialignment.data.jsonl_index import JsonlIndex, check_bad_fraction, write_skip_report
from unialignment.data.records import TaskKind
from unialignment.data.sampler import SampleKey
from unialignment.data.transforms import (
    IMAGE_ERRORS,
    SD3_SIZE_MULTIPLE,
    check_size,
    load_image,
    make_buckets,
    nearest_bucket,
    prepare_images,
)
from unialignment.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """One JSONL file. `task` None infers each record's task from its fields."""

    path: str
    task: str | None = None
    image_root: str | None = None


@dataclass
class TaskGroupConfig:
    """Datasets whose records batch together (same number of condition images), and the group's step weight."""

    name: str
    datasets: list[DatasetConfig]
    weight: float = 1.0

    def __post_init__(self):
        self.datasets = [d if isinstance(d, DatasetConfig) else DatasetConfig(**d) for d in self.datasets]
        if not self.datasets:
            raise UserError(f"task group {self.name!r} lists no datasets")


class TaskGroup:
    """The indexed files of one group, concatenated, and split into aspect-ratio bucket pools when asked.
    `size_multiple`: what every bucket's sides are multiples of (VAE downsampling x patch size)."""

    def __init__(
        self,
        name: str,
        weight: float,
        indexes: list[JsonlIndex],
        buckets: list[tuple[int, int]],
        size_multiple: int = SD3_SIZE_MULTIPLE,
    ):
        self.name, self.weight, self.indexes, self.buckets = name, weight, indexes, buckets
        self.size_multiple = size_multiple
        self._starts = np.cumsum([0] + [len(index) for index in indexes])
        if self._starts[-1] == 0:
            raise UserError(f"task group {name!r} has no valid records in {[str(i.path) for i in indexes]}")
        # Each record's bucket, from img_w / img_h where the record states them; others use the first bucket
        # (the square one when buckets are off).
        if len(buckets) > 1:
            widths = np.concatenate([index.widths for index in indexes])
            heights = np.concatenate([index.heights for index in indexes])
            known = (widths > 0) & (heights > 0)
            square = buckets.index(nearest_bucket(1, 1, buckets))
            record_buckets = np.full(len(widths), square, dtype=np.int64)
            record_buckets[known] = [
                buckets.index(nearest_bucket(w, h, buckets)) for w, h in zip(widths[known], heights[known], strict=True)
            ]
            if not known.all():
                logger.warning(
                    "%s: %d records state no img_w/img_h and use the square bucket", name, int((~known).sum())
                )
        else:
            record_buckets = np.zeros(self._starts[-1], dtype=np.int64)
        used = sorted(set(record_buckets.tolist()))
        self.pool_buckets = [buckets[b] for b in used]  # (height, width) of each pool
        self.pool_members = [np.flatnonzero(record_buckets == b) for b in used]

    @property
    def pool_sizes(self) -> list[int]:
        return [len(members) for members in self.pool_members]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, record_id: int) -> tuple[int, int]:
        """(which of the group's files, row within that file's index) of a group-local record id."""
        file_number = int(np.searchsorted(self._starts, record_id, side="right")) - 1
        return file_number, record_id - int(self._starts[file_number])

    def location(self, record_id: int) -> str:
        file_number, row = self.locate(record_id)
        return self.indexes[file_number].location(row)


def build_task_groups(
    groups: list[TaskGroupConfig | dict],
    resolution: int,
    aspect_ratio_buckets: bool = False,
    check_images: bool = True,
    max_bad_fraction: float = 0.01,
    report_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    size_multiple: int = SD3_SIZE_MULTIPLE,
) -> list[TaskGroup]:
    """Index and validate every file of every group; write the skipped lines to `report_path` (the run
    folder's report) and stop with a clear error when more than `max_bad_fraction` of a file is bad.
    `size_multiple`: the components' VAE downsampling x patch size, which the resolution must divide into."""
    check_size(resolution, resolution, size_multiple)
    buckets = make_buckets(resolution, size_multiple) if aspect_ratio_buckets else [(resolution, resolution)]
    indexed, all_indexes = [], []
    for config in groups:
        config = config if isinstance(config, TaskGroupConfig) else TaskGroupConfig(**config)
        indexes = []
        for dataset in config.datasets:
            if not Path(dataset.path).is_file():
                raise FileNotFoundError(f"task group {config.name!r}: dataset file not found: {dataset.path}")
            task = TaskKind.parse(dataset.task) if dataset.task else None
            indexes.append(
                JsonlIndex.build_or_load(
                    dataset.path,
                    task,
                    image_root=dataset.image_root,
                    check_images=check_images,
                    cache_dir=cache_dir,
                    progress=progress,
                )
            )
        all_indexes.extend(indexes)
        indexed.append((config, indexes))
    if report_path is not None:
        write_skip_report(all_indexes, report_path)
    for index in all_indexes:
        if index.num_skipped:
            logger.warning("%s: skipped %d bad lines (see the skip report)", index.path, index.num_skipped)
    check_bad_fraction(all_indexes, max_bad_fraction)  # first: the reasons say more than "no valid records"
    return [TaskGroup(config.name, config.weight, indexes, buckets, size_multiple) for config, indexes in indexed]


@dataclass
class Sample:
    """One prepared sample: pixels (3, H, W) float32 in [-1, 1] (or uint8 in [0, 255]), or, from the offline
    cache, the frozen components' features instead. `replaced` lists "file:line: reason" for every sample that
    failed to load and was replaced to produce this one."""

    task: TaskKind
    group: int
    num_sources: int
    target_pixels: torch.Tensor | None
    source_pixels: list[torch.Tensor] | None
    features: dict[str, torch.Tensor] | None
    prompt: str
    caption: str
    question: str
    location: str
    record_key: tuple[str, int]  # (JSONL path, valid-record row): where the offline feature cache keeps it
    step: int
    micro_step: int
    replaced: list[str] = field(default_factory=list)


class UniAlignmentDataset(Dataset):
    """Map-style dataset over the task groups, indexed by the sampler's `SampleKey`s.

    A sample whose image cannot be read is replaced by the sample `stride` positions further in the same bucket
    pool (a fixed large prime, so neighbours in a bad folder are skipped), at most `max_attempts` times; past
    that the error names every location tried. Nothing is dropped silently: every replacement is in
    `Sample.replaced`.
    """

    stride = 7919

    def __init__(
        self,
        groups: list[TaskGroup],
        max_attempts: int = 16,
        use_feature_cache: bool = False,
        components_fingerprint: str | None = None,
        uint8_pixels: bool = False,
        draft_decode: bool = False,
    ):
        """`components_fingerprint` (`feature_cache.components_fingerprint` of the run's frozen components) is
        required with `use_feature_cache`: a cache written by other components is not used. `uint8_pixels`: samples
        carry uint8 pixels in [0, 255] (`transforms.to_uint8_pixels`). `draft_decode`: large JPEGs are decoded at a
        reduced scale (`transforms.load_image`)."""
        if use_feature_cache and components_fingerprint is None:
            raise ValueError("use_feature_cache needs the components_fingerprint of the run's frozen components")
        self.groups = groups
        self.max_attempts = max_attempts
        self.uint8_pixels = uint8_pixels
        self.draft_decode = draft_decode
        # Per group, one cache reader per file, or None: a group uses its cache for all files or for none, so a
        # batch never mixes cached features with pixels.
        self.cache_readers: list[list[FeatureCacheReader] | None] = [None] * len(groups)
        for number, group in enumerate(groups if use_feature_cache else []):
            if len(group.pool_buckets) > 1:
                logger.warning("%s: the feature cache is square-only; aspect-ratio buckets encode online", group.name)
                continue
            ((height, width),) = group.pool_buckets
            readers = [
                FeatureCacheReader.open(index.path, height, len(index), components_fingerprint)
                for index in group.indexes
            ]
            if height == width and all(reader is not None for reader in readers):
                self.cache_readers[number] = readers
            elif any(reader is not None for reader in readers):
                logger.warning("%s: not every file has a fresh feature cache; the group encodes online", group.name)

    def prepare(self, group: TaskGroup, record_id: int, key: SampleKey) -> Sample:
        """Read and prepare one record; raises one of IMAGE_ERRORS when it cannot be read."""
        file_number, row = group.locate(record_id)
        index = group.indexes[file_number]
        record = index.read_record(row)
        readers = self.cache_readers[key.group]
        target_pixels = source_pixels = features = None
        if readers is not None:
            reader = readers[file_number]
            if not reader.valid(row):
                raise OSError("its images could not be read when the feature cache was written")
            if reader.image_stamp(row) != image_stamp([*record.source_images, record.target_image]):
                raise OSError(f"its images changed after the feature cache was written; {REBUILD}")
            num_sources, features = reader.row(row)
        else:
            height, width = group.pool_buckets[key.bucket]
            cover = (height, width) if self.draft_decode else None
            target = load_image(record.target_image, cover)
            sources = [load_image(path, cover) for path in record.source_images]
            target_pixels, source_pixels = prepare_images(
                target, sources, height, width, group.size_multiple, self.uint8_pixels
            )
            num_sources = len(source_pixels)
        return Sample(
            record.task,
            key.group,
            num_sources,
            target_pixels,
            source_pixels,
            features,
            record.prompt,
            record.caption,
            record.question,
            record.location,
            (str(index.path), row),
            key.step,
            key.micro_step,
        )

    def __getitem__(self, key: SampleKey) -> Sample:
        group = self.groups[key.group]
        members = group.pool_members[key.bucket]
        failures = []
        for attempt in range(self.max_attempts):
            record_id = int(members[(key.index + attempt * self.stride) % len(members)])
            try:
                sample = self.prepare(group, record_id, key)
            except IMAGE_ERRORS as error:
                failures.append(f"{group.location(record_id)}: {type(error).__name__}: {error}")
                continue
            sample.replaced = failures
            return sample
        raise RuntimeError(
            f"task group {group.name!r}: {self.max_attempts} samples in a row could not be read; "
            "the data is broken beyond skipping:\n" + "\n".join(failures)
        )
