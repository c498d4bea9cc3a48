"""Index and validate every data file of a training config before the job, with every CPU core.

    python scripts/index_data.py configs/stage1_t2i_caption.py [--key value ...]

Each JSONL file gets its index beside it (`.<file>.index.npz`, or under ~/.cache/unialignment when the folder is
read-only) and its bad lines in the report; a training run of the same config then loads the indexes in seconds
instead of building them while the other ranks wait. For a dataset of 100 million lines, run this once (for example
as a CPU job before the GPU job): `train_unialignment.sh` also indexes before launching (its `--check`), but with the
indexes already there that takes no time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from unialignment.data.jsonl_index import JsonlIndex, check_bad_fraction, write_skip_report
from unialignment.data.records import TaskKind
from unialignment.errors import UserError
from unialignment.training.config import load_config, parse_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the training config; --key value overrides it as in scripts/train.py")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes per file (default: all cores)")
    known, rest = parser.parse_known_args(argv)
    try:
        config = load_config(known.config, parse_overrides(rest))
        indexes = []
        for group in config.data.groups:
            for dataset in group["datasets"]:
                task = TaskKind.parse(dataset["task"]) if dataset.get("task") else None
                index = JsonlIndex.build_or_load(
                    dataset["path"],
                    task,
                    image_root=dataset.get("image_root"),
                    check_images=config.data.check_images,
                    num_workers=known.workers,
                )
                print(f"{index.path}: {len(index)} records, {index.num_skipped} lines skipped", flush=True)
                indexes.append(index)
        report = Path(config.work_dir) / "skipped_lines.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        write_skip_report(indexes, report)
        check_bad_fraction(indexes, config.data.max_bad_fraction)
    except (UserError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"skip report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
