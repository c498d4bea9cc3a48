"""The built-in demo end to end at minimal size: the same command as `bash scripts/demo.sh` (world, components,
three DeepSpeed stages, export, inference.py on every held-out record, checker, table), with a handful of steps.

It checks that every step runs and connects: outputs for every held-out record of every task, both score files,
and a table with both models. It does not yet assert learning: at the demo's full length the trained model does
not beat the untrained one (issue #6 is open; see the README's section on the built-in small default).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from unialignment.toy.folder import read_split
from unialignment.toy.heldout import METRICS

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_and_scores_every_task(tmp_path):
    out = tmp_path / "toy"
    command = [
        sys.executable, "scripts/toy_demo.py", "--out", str(out),
        "--steps-scale", "0.01", "--vae-steps", "5", "--sample-steps", "2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| metric | untrained | aligned |" in result.stdout

    heldout = read_split(out / "world", "heldout")
    expected = {task: len(records) for task, records in heldout.items()}
    expected["caption"] = expected["t2i"]
    for task, count in expected.items():
        assert len(list((out / "aligned" / "outputs" / task).iterdir())) == count, task
    for folder in ("untrained", "aligned"):
        scores = json.loads((out / folder / "scores.json").read_text())
        assert list(scores) == list(METRICS) and all(0.0 <= value <= 1.0 for value in scores.values())
    # each stage started from the previous stage's EMA export
    stage3 = (out / "aligned" / "stage3_sft" / "config.py").read_text()
    assert str(out / "aligned" / "stage2_multitask" / "export" / "ema") in stage3
