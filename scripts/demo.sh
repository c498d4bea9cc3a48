#!/usr/bin/env bash
# The built-in small default, end to end on CPU: make the shapes world and its tiny components, train the toy
# stages through DeepSpeed, export the pipeline, run inference.py on every held-out record of the tasks those
# stages train, and print a table scored by a pixel and word checker beside an untrained baseline (19-25 minutes
# on 2 CPU cores).
#   bash scripts/demo.sh                    # every loss term
#   bash scripts/demo.sh --full             # also perception maps and compositions (45-59 minutes by machine)
#   bash scripts/demo.sh --seeds 3          # both variants over three seeds: each metric's mean and spread
#   bash scripts/demo.sh --no-alignment     # the same without the alignment losses; the table then shows both
#   bash scripts/demo.sh --data DIR         # your own dataset folder: DIR/train/*.jsonl, DIR/heldout/*.jsonl
# Options: python scripts/toy_demo.py --help
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/toy_demo.py "$@"
