"""Offline feature cache (beyond the reference, for speed): the frozen components' outputs, once per record.

For a JSONL file and a resolution, the cache stores in sharded safetensors beside the data
(`.<file>.features/<resolution>px/`): the VAE posterior mean and std of the target and of every condition image,
the T5 states of the prompt and the teacher's image and text targets, one row per valid record of the file's
index, plus a `valid` flag for rows whose images could not be read. Storing the posterior rather than one latent
keeps the sampling noise fresh every epoch, as online encoding does. `FeatureCacheReader` reads single rows
lazily; a cache whose JSONL file, resolution, format or frozen components (`components_fingerprint`: every
setting that changes a cached value) have changed since it was written is not used, with a warning that names
what changed and how to rebuild it. The writer is `unialignment.data.features.write_feature_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from unialignment.frozen.components import FrozenComponents

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: each row records what its image files were (`image_stamp`)


def cache_folder(jsonl_path: str | Path, resolution: int) -> Path:
    jsonl_path = Path(jsonl_path)
    return jsonl_path.parent / f".{jsonl_path.name}.features" / f"{resolution}px"


REBUILD = (
    "rebuild it with `python scripts/cache_features.py CONFIG [--key value ...]`, the run's own config and overrides"
)


def source_fingerprint(jsonl_path: Path) -> dict:
    stat = os.stat(jsonl_path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def image_stamp(paths: list[str]) -> int:
    """What a record's image files are, cheaply: a 63-bit digest of each file's path, size and modification time.
    The cache stores it per row; a row whose files have changed since is not used (`UniAlignmentDataset`)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def _digest(values) -> str:
    digest = hashlib.sha256()
    for name, value in values:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            # The first values of every tensor tell one checkpoint from another, cheaply even at full size.
            digest.update(value.detach().flatten()[:256].float().cpu().numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _config(module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Bookkeeping that does not change what a model computes.
    return {k: v for k, v in values.items() if k not in ("_name_or_path", "_diffusers_version", "transformers_version")}


def components_fingerprint(components: FrozenComponents) -> dict[str, object]:
    """Every setting of the frozen components that changes a cached value, by the config key that sets it: the
    weights and configs of T5, the VAE and the teacher (which is what their folders are), the tokenizer's
    vocabulary, the text length, the mask-token row (a learned mask embedding replaces it), the dtype and the
    teacher's padding rule and text length. A cache written under other values would feed a run features of
    other models; `FeatureCacheReader.open` names each one that differs."""
    t5, vae, teacher = components.t5, components.vae, components.teacher
    teacher_module = teacher if isinstance(teacher, torch.nn.Module) else getattr(teacher, "model", None)
    teacher_model = getattr(teacher, "model", teacher_module)
    return {
        "components.text_encoder (weights)": _digest(t5.encoder.state_dict().items()),
        "components.text_encoder (config)": _digest(_config(t5.encoder).items()),
        "components.tokenizer": _digest(sorted(t5.tokenizer.get_vocab().items())),
        "components.text_length": t5.max_length,
        "components.mask_embedding": _digest([("row", t5.encoder.get_input_embeddings().weight[t5.mask_token_id])]),
        "components.vae (weights)": _digest(vae.vae.state_dict().items()),
        "components.vae (config)": _digest(_config(vae.vae).items()),
        "components.dtype": [str(t5.dtype), str(vae.dtype), str(getattr(teacher_model, "dtype", None))],
        "components.teacher": None if teacher is None else type(teacher).__qualname__,
        # any teacher with the two target methods plugs in; its weights count where it exposes them
        "components.teacher (weights)": None
        if not isinstance(teacher_module, torch.nn.Module)
        else _digest(teacher_module.state_dict().items()),
        "components.teacher (config)": _digest(_config(teacher_model).items()),
        "components.teacher_average_padding": getattr(teacher, "average_padding", None),
        "components.teacher_padding": getattr(teacher, "pad_to", None),
        "components.text_length (teacher)": getattr(teacher, "max_text_length", None),
    }


def _changes(written: object, now: dict) -> list[str]:
    """What differs between a cache's recorded components and the run's, one phrase per setting."""
    if not isinstance(written, dict):
        return ["the cache was written by an older version of the code"]
    changes = []
    for key in sorted(set(written) | set(now)):
        before, after = written.get(key), now.get(key)
        if before != after:
            digests = str(before).startswith("sha256:") and str(after).startswith("sha256:")
            changes.append(f"{key} differs" if digests else f"{key} was {before!r}, now {after!r}")
    return changes


def stale_settings(meta: dict, jsonl_path: str | Path, resolution: int, num_rows: int, components: dict) -> list[str]:
    """The recorded settings of a cache (its `meta.json`) that differ from the run's; none: the cache is fresh."""
    expected = {
        "version": FORMAT_VERSION,
        "resolution": resolution,
        "num_rows": num_rows,
        "source": source_fingerprint(Path(jsonl_path)),
        "components": components,
    }
    return [key for key, value in expected.items() if meta.get(key) != value]


class FeatureCacheReader:
    """Rows of one file's cache. Holds paths, not handles, so it pickles into DataLoader workers."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.shard_size, self.names = meta["shard_size"], meta["names"]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    @classmethod
    def open(
        cls, jsonl_path: str | Path, resolution: int, num_rows: int, components: dict
    ) -> FeatureCacheReader | None:
        """The cache of a file, or None (with a log line saying why and how to rebuild it) when there is none or it
        is stale. `components`: the run's `components_fingerprint`."""
        folder = cache_folder(jsonl_path, resolution)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            others = sorted(p.parent.name for p in folder.parent.glob("*px/meta.json"))
            if others:
                logger.warning(
                    "feature cache of %s: none at resolution %d px (there is one at %s); encoding it online; %s",
                    jsonl_path, resolution, ", ".join(others), REBUILD,
                )  # fmt: skip
            return None
        meta = json.loads(meta_path.read_text())
        stale = stale_settings(meta, jsonl_path, resolution, num_rows, components)
        if stale:
            details = _changes(meta.get("components"), components) if "components" in stale else []
            logger.warning(
                "feature cache %s is stale (%s changed)%s; encoding %s online; %s",
                folder, ", ".join(stale), (": " + "; ".join(details)) if details else "", jsonl_path, REBUILD,
            )  # fmt: skip
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

    def image_stamp(self, row: int) -> int:
        """The row's `image_stamp` when the cache was written."""
        shard = self._shard(row // self.shard_size)
        return int(shard.get_slice("image_stamp")[row % self.shard_size : row % self.shard_size + 1][0])

    def row(self, row: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(number of condition images, the row's features by name)."""
        shard, offset = self._shard(row // self.shard_size), row % self.shard_size
        num_sources = int(shard.get_slice("num_sources")[offset : offset + 1][0])
        names = [n for n in self.names if not n.startswith("source_") or int(n.split("_")[1]) < num_sources]
        return num_sources, {name: shard.get_slice(name)[offset : offset + 1][0] for name in names}
