"""Training a researcher can watch: labelled sample grids from step 0 (EMA weights), per-task-group loss curves,
time and throughput, a run header, a validation loss free of sampling noise, and an optional W&B tracker."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unialignment.errors import UserError
from unialignment.training.metrics_log import MetricsLog
from unialignment.training.samples import label_strip, labelled_tile

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = "configs/debug.py"


@pytest.fixture(scope="module", autouse=True)
def debug_assets():
    subprocess.run([sys.executable, "scripts/make_debug_assets.py"], cwd=REPO, check=True, capture_output=True)


def _train(work_dir, *overrides) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    command = [sys.executable, "scripts/train.py", DEBUG_CONFIG, "--work_dir", str(work_dir), *overrides]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**environment, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_tile_is_its_image_above_a_rendering_of_its_text():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    text = "a red square on the left of a blue circle"
    tile = labelled_tile([image], text)
    enlarged = image.resize((128, 128), Image.Resampling.NEAREST)  # small images are shown 4 x
    assert np.array_equal(np.asarray(tile.crop((0, 0, 128, 128))), np.asarray(enlarged))
    strip = label_strip(text, 128)
    assert tile.size == (128, 128 + strip.height)
    assert np.array_equal(np.asarray(tile.crop((0, 128, 128, tile.height))), np.asarray(strip))
    assert np.asarray(strip).min() < 128  # there is dark text on the white strip
    # an edit: source | output side by side over the instruction
    pair = labelled_tile([image, image], "make it green")
    assert pair.width == 256
    assert np.array_equal(
        np.asarray(pair.crop((0, 128, 256, pair.height))), np.asarray(label_strip("make it green", 256))
    )


def test_a_run_logs_samples_from_step_0_groups_time_a_header_and_validation(tmp_path):
    validation = json.dumps(
        [{"name": "t2i", "weight": 1, "datasets": [{"path": "runs/debug_assets/data/t2i.jsonl", "task": "t2i"}]}]
    )
    common = ["--logging.sample_every_steps", "2", "--validation.groups", validation, "--validation.every_steps", "1"]
    _train(
        tmp_path,
        "--max_steps",
        "2",
        "--optimizer.lr",
        "0",
        "--validation.samples_per_group",
        "4",
        "--logging.every_steps",
        "1",
        *common,
    )

    for step in ("step_00000000", "step_00000002"):
        for grid in ("t2i", "edit", "captions"):
            assert (tmp_path / "samples" / step / f"{grid}.png").is_file(), (step, grid)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the debug config alternates t2i and edit steps: each step carries its group's curves
    assert "loss/image/t2i" in metrics[0] and "loss/image/edit" not in metrics[0]
    assert "loss/image/edit" in metrics[1] and "loss/text/edit" in metrics[1]
    for record in metrics:
        assert record["time/step_s"] >= record["time/data_s"] >= 0 and record["samples_per_s"] > 0
    log = (tmp_path / "train.log").read_text()
    assert "code: " in log and "layout: world size 1, micro-batch 2 x 4 accumulation" in log
    assert "step 2/2 (" in log  # the step of the total, and the time left

    # lr 0: the same weights at both steps, so the same validation loss, to the last digit
    records = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert records[0]["val/loss/total"] == records[1]["val/loss/total"]
    assert records[0]["val/loss/total/t2i"] == records[0]["val/loss/total"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Images("samples/t2i")] == [0, 2]
    assert [event.step for event in events.Scalars("val/loss/total")] == [1, 2]
    assert {"loss/image/t2i", "loss/image/edit", "time/step_s", "time/data_s"} <= set(events.Tags()["scalars"])


def test_weights_and_biases_gets_the_same_scalars_images_and_texts(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(
        log=lambda values, step: calls.append((step, values)), finish=lambda: calls.append("end")
    )
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: run
    fake.Image = lambda image: ("image", image.size)
    fake.Html = lambda html: ("html", html)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLog(tmp_path, True, 10, 0, 5, tracker="wandb") as log:
        log.write(1, {"loss/total": 0.5, "lr": 0.1})
        log.image("samples/t2i", Image.new("RGB", (8, 4)), 1)
        log.text("run/header", "code: abc", 0)
    assert calls[0] == (1, {"loss/total": 0.5, "train/lr": 0.1})
    assert calls[1] == (1, {"samples/t2i": ("image", (8, 4))})
    assert calls[2][1]["run/header"][0] == "html" and calls[-1] == "end"

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLog(tmp_path, True, 10, 0, 5, tracker="wandb")
