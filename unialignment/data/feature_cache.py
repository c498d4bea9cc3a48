"""Offline feature cache (beyond the reference, for speed): the frozen components' outputs, once per record.

For a JSONL file and a resolution, `write_feature_cache` stores in sharded safetensors beside the data
(`.<file>.features/<resolution>px/`): the VAE posterior mean and std of the target and of every condition image,
the T5 states of the prompt and the teacher's image and text targets, one row per valid record of the file's
index, plus a `valid` flag for rows whose images could not be read. Storing the posterior rather than one latent
keeps the sampling noise fresh every epoch, as online encoding does. `FeatureCacheReader` reads single rows
lazily; a cache whose JSONL file, resolution, format or frozen components (`components_fingerprint`: weights,
tokenizer, mask embedding, text length) have changed since it was written is not used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from unialignment.data.collate import Collator
from unialignment.data.features import FrozenComponents, compute_features
from unialignment.data.jsonl_index import JsonlIndex

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def cache_folder(jsonl_path: str | Path, resolution: int) -> Path:
    jsonl_path = Path(jsonl_path)
    return jsonl_path.parent / f".{jsonl_path.name}.features" / f"{resolution}px"


def _fingerprint(jsonl_path: Path) -> dict:
    stat = os.stat(jsonl_path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def components_fingerprint(components: FrozenComponents) -> str:
    """A digest of what the frozen components compute: the first values of every weight tensor of T5, the VAE and
    the teacher (enough to tell one checkpoint from another, cheap even at full size), T5's mask-token row (a learned
    mask embedding replaces it), the tokenizer's vocabulary, the text length, the VAE's latent scaling and the
    teacher's padding rule. A cache written under another fingerprint would feed a run features of other models."""
    digest = hashlib.sha256()

    def add(name: str, value) -> None:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().flatten()[:256].float().cpu().numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())

    def add_module(prefix: str, module: torch.nn.Module) -> None:
        for name, tensor in module.state_dict().items():
            add(f"{prefix}.{name}", tensor)

    t5, vae, teacher = components.t5, components.vae, components.teacher
    add_module("t5", t5.encoder)
    add("t5.mask_row", t5.encoder.get_input_embeddings().weight[t5.mask_token_id])
    add("t5.vocab", sorted(t5.tokenizer.get_vocab().items()))
    add("t5.text_length", t5.max_length)
    add_module("vae", vae.vae)
    add("vae.scaling", [vae.vae.config.scaling_factor, vae.vae.config.shift_factor])
    add("teacher", None if teacher is None else type(teacher).__qualname__)
    # any teacher with the two target methods plugs in; its weights count where it exposes them
    module = teacher if isinstance(teacher, torch.nn.Module) else getattr(teacher, "model", None)
    if isinstance(module, torch.nn.Module):
        add_module("teacher", module)
    add("teacher.average_padding", getattr(teacher, "average_padding", None))
    return digest.hexdigest()[:24]


class FeatureCacheReader:
    """Rows of one file's cache. Holds paths, not handles, so it pickles into DataLoader workers."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.shard_size, self.names = meta["shard_size"], meta["names"]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, jsonl_path: str | Path, resolution: int, num_rows: int, components: str) -> FeatureCacheReader | None:
        """The cache of a file, or None (with a log line saying why) when there is none or it is stale.
        `components`: the run's `components_fingerprint`."""
        folder = cache_folder(jsonl_path, resolution)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        expected = {
            "version": FORMAT_VERSION,
            "resolution": resolution,
            "num_rows": num_rows,
            "source": _fingerprint(Path(jsonl_path)),
            "components": components,
        }
        stale = [key for key, value in expected.items() if meta.get(key) != value]
        if stale:
            logger.warning(
                "feature cache %s is stale (%s changed); encoding %s online", folder, ", ".join(stale), jsonl_path
            )
            return None
        return cls(folder, meta)

    def _shard(self, shard: int):
        if self._pid != os.getpid():  # a forked worker must not share the parent's file handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / f"shard-{shard:05d}.safetensors", framework="pt")
        return self._handles[shard]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def valid(self, row: int) -> bool:
        shard = self._shard(row // self.shard_size)
        return bool(shard.get_slice("valid")[row % self.shard_size : row % self.shard_size + 1][0])

    def row(self, row: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(number of condition images, the row's features by name)."""
        shard, offset = self._shard(row // self.shard_size), row % self.shard_size
        num_sources = int(shard.get_slice("num_sources")[offset : offset + 1][0])
        names = [n for n in self.names if not n.startswith("source_") or int(n.split("_")[1]) < num_sources]
        return num_sources, {name: shard.get_slice(name)[offset : offset + 1][0] for name in names}


@torch.no_grad()
def write_feature_cache(
    index: JsonlIndex,
    components: FrozenComponents,
    resolution: int,
    batch_size: int = 16,
    shard_size: int = 1024,
    storage_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> Path:
    """Encode every valid record of `index` at `resolution` (square, as without aspect-ratio buckets)."""
    # Imported here: the dataset module reads caches, so a module-level import would be circular.
    from unialignment.data.dataset import IMAGE_ERRORS, TaskGroup, UniAlignmentDataset
    from unialignment.data.sampler import SampleKey

    folder = cache_folder(index.path, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    group = TaskGroup(str(index.path), 1.0, [index], [(resolution, resolution)])
    dataset = UniAlignmentDataset([group], max_attempts=1)
    collator = Collator(components.t5.tokenizer, components.t5.max_length)
    names, failures = None, []
    rows = range(len(index))
    bar = tqdm(total=len(index), desc=f"caching {index.path.name}", disable=not progress)
    for shard, shard_start in enumerate(range(0, len(index), shard_size)):
        shard_rows = rows[shard_start : shard_start + shard_size]
        columns: dict[str, list[torch.Tensor]] = {}
        valid = torch.zeros(len(shard_rows), dtype=torch.uint8)
        num_sources = torch.zeros(len(shard_rows), dtype=torch.uint8)
        for batch_start in range(0, len(shard_rows), batch_size):
            samples, positions = [], []
            for position, row in enumerate(shard_rows[batch_start : batch_start + batch_size], start=batch_start):
                try:
                    samples.append(dataset.prepare(group, row, SampleKey(0, 0, row, 0, 0)))
                    positions.append(position)
                except IMAGE_ERRORS as error:  # an unreadable record is marked invalid, never fatal
                    failures.append(f"{index.location(row)}: {type(error).__name__}: {error}")
            # Records of one file may differ in their number of condition images: encode each count apart.
            for count in sorted({s.num_sources for s in samples}):
                chosen = [(p, s) for p, s in zip(positions, samples, strict=True) if s.num_sources == count]
                features = compute_features(collator([s for _, s in chosen]), components)
                names = names or sorted(features)
                for name in names:
                    column = columns.setdefault(name, [None] * len(shard_rows))
                    for (position, _), value in zip(chosen, features[name].cpu(), strict=True):
                        column[position] = value.to(storage_dtype)
                valid[[p for p, _ in chosen]] = 1
                num_sources[[p for p, _ in chosen]] = count
            bar.update(len(shard_rows[batch_start : batch_start + batch_size]))
        if names is None:
            raise RuntimeError(f"no record of {index.path} could be read for the feature cache: {failures[:5]}")
        tensors = {"valid": valid, "num_sources": num_sources}
        for name in names:
            column = columns.get(name, [None] * len(shard_rows))
            template = (
                next(value for value in column if value is not None) if any(v is not None for v in column) else None
            )
            if template is None:  # a whole shard without this feature (no record had that many sources)
                continue
            tensors[name] = torch.stack(
                [value if value is not None else torch.zeros_like(template) for value in column]
            )
        save_file(tensors, folder / f"shard-{shard:05d}.safetensors")
    bar.close()
    meta = {
        "version": FORMAT_VERSION,
        "resolution": resolution,
        "num_rows": len(index),
        "source": _fingerprint(Path(index.path)),
        "components": components_fingerprint(components),
        "shard_size": shard_size,
        "names": names,
        "storage_dtype": str(storage_dtype),
        "failures": failures,
    }
    # meta.json last: a cache without it is incomplete and never read.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    if failures:
        logger.warning(
            "%d records of %s could not be cached (marked invalid): %s", len(failures), index.path, failures[:5]
        )
    return folder
