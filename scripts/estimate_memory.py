"""The README's table of training memory per rank, computed (`unialignment.training.memory`), for a stage config at
full size on one node of 8 GPUs: 512 and 1024 px, ZeRO-2 and ZeRO-3 with and without optimizer offload at the
config's micro-batch and checkpointing, and ZeRO-2 without checkpointing at that micro-batch and at twice it.

    python scripts/estimate_memory.py [--config configs/stage1_t2i_caption.py] [--world-size 8]

For one run's own estimate: `python scripts/train.py CONFIG --check`.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch

from unialignment.benchmark.full_size import frozen_settings, write_full_size_folders
from unialignment.models import UniAlignmentTransformer
from unialignment.training.builders import transformer_config
from unialignment.training.config import load_config
from unialignment.training.memory import GiB, frozen_parameters, training_memory

CARDS_GIB = {"80 GB": 79.6, "141 GB": 139.8}  # what torch reports as usable on an H100 80GB and an H200


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/stage1_t2i_caption.py")
    parser.add_argument("--world-size", type=int, default=8)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        base = load_config(args.config, {"model.load_from": None})
        components = frozen_settings(write_full_size_folders(Path(folder)), base)
        base.components = components
        frozen = frozen_parameters(base)
        with torch.device("meta"):
            model = UniAlignmentTransformer.from_config(transformer_config(base, vocab_size=32100))
        model_config, parameters = dict(model.config), sum(p.numel() for p in model.parameters())
        micro_batch = base.batch.micro_batch_size
        settings = [(stage, offload, micro_batch, True) for stage, offload in itertools.product((2, 3), (False, True))]
        settings += [(2, False, micro_batch, False), (2, False, 2 * micro_batch, False)]
        for resolution, (stage, offload, micro, checkpointing) in itertools.product((512, 1024), settings):
            overrides = {
                "deepspeed.zero_stage": stage,
                "deepspeed.offload_optimizer": offload,
                "model.load_from": None,
                "batch.micro_batch_size": micro,
                "batch.global_batch_size": micro * args.world_size,
                "speed.gradient_checkpointing": checkpointing,
            }
            config = load_config(args.config, overrides)
            config.components = components
            estimate = training_memory(
                config, args.world_size, model_config, parameters, parameters, frozen, resolution
            )
            rows.append(
                dict(
                    resolution=resolution,
                    zero=stage,
                    offload=offload,
                    micro_batch=config.batch.micro_batch_size,
                    checkpointing=config.speed.gradient_checkpointing,
                    gib=estimate.total / GiB,
                )
            )
    print(
        f"| px | ZeRO | optimizer offload | micro-batch | checkpointing | GiB per rank ({args.world_size} ranks) | "
        + " | ".join(f"fits {card}" for card in CARDS_GIB)
        + " |"
    )
    print("| ---: | ---: | --- | ---: | --- | ---: |" + " --- |" * len(CARDS_GIB))
    for row in rows:
        fits = " | ".join("yes" if row["gib"] <= usable else "no" for usable in CARDS_GIB.values())
        print(
            f"| {row['resolution']} | {row['zero']} | {'yes' if row['offload'] else 'no'} | {row['micro_batch']} | "
            f"{row['checkpointing']} | {row['gib']:.1f} | {fits} |"
        )
    return rows


if __name__ == "__main__":
    main()
