"""Precompute the frozen components' outputs for a training config's data (the offline feature cache).

For every valid record of every dataset the config names: the VAE posterior (mean, std) of the target and
condition images, the T5 states of the prompt, and the alignment teacher's image and text targets, written as
sharded safetensors beside the data (`.<file>.features/<resolution>px/`). The components, text length, teacher
padding rule, dtype and resolution are the config's, loaded by the same code as training, so a run of that config
with `--data.use_feature_cache true` reads exactly what it would have computed.

    python scripts/cache_features.py configs/stage1_t2i_caption.py
    python scripts/cache_features.py configs/stage1_t2i_caption.py --components.text_length 128 --batch-size 32
"""

from __future__ import annotations

import argparse

import torch

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
            folder = write_feature_cache(
                index,
                components,
                config.data.resolution,
                known.batch_size,
                known.shard_size,
                size_multiple=size_multiple,
            )
            print(f"{index.path}: {len(index)} records cached in {folder} ({index.num_skipped} lines skipped)")


if __name__ == "__main__":
    main()
