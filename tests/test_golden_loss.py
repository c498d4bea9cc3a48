"""The debug config's loss curve against a stored golden one (as torchtitan keeps its loss curves).

The whole debug run (40 steps, every loss term, DeepSpeed on CPU) is rerun and its per-step total loss compared
with `tests/golden/debug_loss_curve.json`. The tolerance lets through what float arithmetic does on another CPU or
thread count (measured: 9e-8 relative over the 40 steps, 1 against 2 threads) and nothing a changed objective,
schedule or data order does (those move the curve by 1e-2 or more within a few steps). When a change is meant to
move the curve, regenerate the file and commit it with the change:

    UNIALIGNMENT_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden_loss.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "debug_loss_curve.json"
RELATIVE_TOLERANCE = 1e-4


def debug_loss_curve(work_dir: Path, *overrides: str) -> list[float]:
    subprocess.run([sys.executable, "scripts/make_debug_assets.py"], cwd=REPO, check=True, capture_output=True)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    command = [
        sys.executable, "scripts/train.py", "configs/debug.py", "--work_dir", str(work_dir),
        "--logging.sample_every_steps", "0", *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, len(records) + 1))
    return [record["loss/total"] for record in records]


def test_the_debug_run_follows_the_golden_loss_curve(tmp_path):
    curve = debug_loss_curve(tmp_path)
    if os.environ.get("UNIALIGNMENT_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "configs/debug.py", "loss/total": curve}, indent=1) + "\n")
        pytest.skip(f"regenerated {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())["loss/total"]
    assert len(curve) == len(golden), f"the debug run has {len(curve)} steps, the golden curve {len(golden)}"
    moved = [
        f"step {step}: {value:.6g} against {expected:.6g}"
        for step, (value, expected) in enumerate(zip(curve, golden, strict=True), start=1)
        if abs(value - expected) > RELATIVE_TOLERANCE * abs(expected)
    ]
    assert not moved, "the debug loss curve moved (regenerate it if that is intended):\n" + "\n".join(moved[:10])


def test_the_tolerance_catches_a_changed_schedule(tmp_path):
    """The same run with a warm-up of 6 steps instead of 5: the curve must leave the tolerance."""
    golden = json.loads(GOLDEN.read_text())["loss/total"]
    curve = debug_loss_curve(tmp_path, "--optimizer.warmup_steps", "6")
    gaps = [abs(value - expected) / abs(expected) for value, expected in zip(curve, golden, strict=True)]
    assert max(gaps) > 10 * RELATIVE_TOLERANCE, gaps
