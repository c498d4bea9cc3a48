"""The built-in demo end to end: the same command as `bash scripts/demo.sh` (world, components, DeepSpeed stages,
export, inference.py on every held-out record, checker, table).

The first test runs all three stages with a handful of steps and checks that every step runs and connects. The
second runs a shortened demo (stage 1 only, a few minutes on 2 cores) and checks that the model has learned: its
held-out text-to-image colours and positions are well above the untrained baseline's.
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
        "--steps-scale", "0.01", "--vae-steps", "5", "--teacher-steps", "2", "--sample-steps", "2", "--text-steps", "2",
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


def test_short_demo_learns_colours_and_positions_of_heldout_prompts(tmp_path):
    """Stage 1 only (800 of its 1000 steps) on the shapes world, given with --data as a user's folder would be, its
    held-out split cut to the text-to-image prompts so that the evaluation is quick. About 9 minutes on 2 cores."""
    data = tmp_path / "world"
    subprocess.run([sys.executable, "scripts/make_toy_world.py", "--out", str(data)], cwd=REPO, check=True)
    for task in ("edit", "perception", "composition", "vqa"):
        (data / "heldout" / f"{task}.jsonl").unlink()
    out = tmp_path / "toy"
    command = [
        sys.executable, "scripts/toy_demo.py", "--data", str(data), "--out", str(out),
        "--stages", "1", "--steps-scale", "0.8",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    untrained = json.loads((out / "untrained" / "scores.json").read_text())
    trained = json.loads((out / "aligned" / "scores.json").read_text())
    assert set(trained) == {"t2i colour", "t2i shape", "t2i position", "caption colour+shape"}
    # held-out prompts name colour-shape-position combinations that no training image shows
    for metric in ("t2i colour", "t2i position"):
        assert trained[metric] >= untrained[metric] + 0.3, (metric, untrained, trained)
