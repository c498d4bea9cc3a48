"""Train UniAlignment: `python scripts/train.py CONFIG [--key value ...]`, usually through train_unialignment.sh.

Dotted keys override the config (`--optimizer.lr 1e-4 --data.num_workers 8`); values are Python literals or
plain strings. Launched by torchrun or the deepspeed launcher, every process runs this same command.

    python scripts/train.py CONFIG --check [--world-size N]   # validate everything, load no weight, start nothing
    python scripts/train.py CONFIG --print-config               # the merged, checked config: every key and value

A mistake in the config, a folder or the data is printed once, as one line naming the key, file or line, and the
exit status is 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from unialignment.errors import UserError
from unialignment.training.config import TrainConfig, load_config, parse_overrides

# Mistakes of the user's, and the file system's (a missing folder, a full disk, a read-only folder), reported without
# a traceback: the loaders' FileNotFoundError and every OSError name the path.
USER_ERRORS = (UserError, OSError)


def sections() -> str:
    """The config's top-level keys, each section with the first line of its docstring."""
    lines = ["config keys (override any field with --key value, a section's with --section.key value):"]
    for name, kind in typing.get_type_hints(TrainConfig).items():
        if dataclasses.is_dataclass(kind):
            about = (kind.__doc__ or "").strip().split(". ")[0].splitlines()[0].rstrip(".")
            lines.append(f"  {name:<24} section: {about}")
        else:
            lines.append(f"  {name:<24} {getattr(kind, '__name__', str(kind).replace('typing.', ''))}")
    lines.append("every key and its value: python scripts/train.py CONFIG --print-config")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=sections(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="an mmengine config file, e.g. configs/stage1_t2i_caption.py")
    parser.add_argument("--check", action="store_true", help="check the run without loading weights; start nothing")
    parser.add_argument("--world-size", type=int, help="with --check: the number of ranks (default: WORLD_SIZE, or 1)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config as JSON and exit")
    known, rest = parser.parse_known_args(argv)
    try:
        config = load_config(known.config, parse_overrides(rest))
        if known.print_config:
            print(json.dumps(config.to_dict(), indent=1, default=str))
        elif known.check:
            # Imported here: the check and the trainer each pull in what they need, and --help stays quick.
            from unialignment.training.preflight import check_run, summary

            world_size = known.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            print("\n".join(summary(config, check_run(config, world_size))))
        else:
            from unialignment.training.trainer import Trainer

            Trainer(config).train()
    except USER_ERRORS as error:
        if os.environ.get("RANK", "0") == "0":  # every rank meets the same mistake; one says it
            print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
