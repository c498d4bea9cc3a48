"""Train UniAlignment: `python scripts/train.py CONFIG [--key value ...]`, usually through train_unialignment.sh.

Dotted keys override the config (`--optimizer.lr 1e-4 --data.num_workers 8`); values are Python literals or
plain strings. Launched by torchrun or the deepspeed launcher, every process runs this same command.
"""

from __future__ import annotations

import argparse

from unialignment.training.config import load_config, parse_overrides
from unialignment.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="an mmengine config file, e.g. configs/stage1_t2i_caption.py")
    known, rest = parser.parse_known_args()
    Trainer(load_config(known.config, parse_overrides(rest))).train()


if __name__ == "__main__":
    main()
