"""Train UniAlignment: `python scripts/train.py CONFIG [--key value ...]`, usually through train_unialignment.sh.

Dotted keys override the config (`--optimizer.lr 1e-4 --data.num_workers 8`); values are Python literals or
plain strings. Launched by torchrun or the deepspeed launcher, every process runs this same command.
"""

from __future__ import annotations

import argparse

from unialignment.training.config import ConfigError, load_config, parse_override
from unialignment.training.trainer import Trainer


def parse_overrides(arguments: list[str]) -> dict:
    overrides, position = {}, 0
    while position < len(arguments):
        argument = arguments[position]
        if argument.startswith("--local_rank") or argument.startswith("--local-rank"):
            position += 1 if "=" in argument else 2  # set by the deepspeed launcher; LOCAL_RANK says the same
            continue
        if not argument.startswith("--"):
            raise ConfigError(f"expected --key value, got {argument!r}")
        if "=" in argument:
            key, value = argument[2:].split("=", 1)
            position += 1
        else:
            if position + 1 >= len(arguments):
                raise ConfigError(f"{argument} has no value")
            key, value = argument[2:], arguments[position + 1]
            position += 2
        overrides[key.replace("-", "_")] = parse_override(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="an mmengine config file, e.g. configs/stage1_t2i_caption.py")
    known, rest = parser.parse_known_args()
    Trainer(load_config(known.config, parse_overrides(rest))).train()


if __name__ == "__main__":
    main()
