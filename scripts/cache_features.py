"""Precompute the frozen components' outputs for a training config's data (the offline feature cache).

For every valid record of every dataset the config names: the VAE posterior (mean, std) of the target and
condition images, the T5 states of the prompt, and the alignment teacher's image and text targets, written as
sharded safetensors beside the data (`.<file>.features/<resolution>px/`). The components, text length, teacher
padding rule, dtype and resolution are the config's, loaded by the same code as training, so a run of that config
with `--data.use_feature_cache true` reads what it would have computed: rounded to bfloat16 by default, and with
`--storage-dtype float32` up to the float32 rounding of encoding each record in another batch. `--skip-fresh`
keeps the caches that are already fresh (one run per stage reuses the files an earlier stage cached).

    python scripts/cache_features.py configs/stage1_t2i_caption.py
    python scripts/cache_features.py configs/stage1_t2i_caption.py --components.text_length 128 --batch-size 32
    python scripts/cache_features.py configs/stage2_multitask.py --skip-fresh
"""

from __future__ import annotations

import argparse
import json

import torch

from unialignment.data.feature_cache import cache_folder, components_fingerprint, stale_settings
from unialignment.data.features import write_feature_cache
from unialignment.data.jsonl_index import JsonlIndex
from unialignment.data.records import TaskKind
from unialignment.frozen.components import load_frozen_components
from unialignment.training.builders import transformer_patch_size
from unialignment.training.config import load_config, parse_overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the training config; --key value overrides it as in scripts/train.py")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--storage-dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="how the features are stored (float32: what online encoding computes, up to float32 rounding)",
    )
    parser.add_argument(
        "--skip-fresh",
        action="store_true",
        help="keep a file's cache when it is fresh for these components and settings and has this storage dtype",
    )
    known, rest = parser.parse_known_args(argv)
    config = load_config(known.config, parse_overrides(rest))

    components = load_frozen_components(config.components, known.device)
    size_multiple = components.vae.downsample_factor * transformer_patch_size(config)
    for group in config.data.groups:
        for dataset in group["datasets"]:
            task = TaskKind.parse(dataset["task"]) if dataset.get("task") else None
            # Indexed as the trainer indexes it, so that the cache's rows are the trainer's records.
            index = JsonlIndex.build_or_load(
                dataset["path"], task, image_root=dataset.get("image_root"), check_images=config.data.check_images
            )
            if known.skip_fresh and _is_fresh(index, config.data.resolution, components, known.storage_dtype):
                print(f"{index.path}: its feature cache is fresh; kept")
                continue
            folder = write_feature_cache(
                index,
                components,
                config.data.resolution,
                known.batch_size,
                known.shard_size,
                getattr(torch, known.storage_dtype),
                size_multiple=size_multiple,
            )
            print(f"{index.path}: {len(index)} records cached in {folder} ({index.num_skipped} lines skipped)")


def _is_fresh(index: JsonlIndex, resolution: int, components, storage_dtype: str) -> bool:
    """Whether the file's cache at `resolution` exists, matches its file and these components, and was stored in
    `storage_dtype` (rows whose images changed since are still checked one by one when training reads them)."""
    meta_path = cache_folder(index.path, resolution) / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    stale = stale_settings(meta, index.path, resolution, len(index), components_fingerprint(components))
    return not stale and meta.get("storage_dtype") == str(getattr(torch, storage_dtype))


if __name__ == "__main__":
    main()
