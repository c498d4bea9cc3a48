"""The built-in demo end to end: the same command as `bash scripts/demo.sh` (world, components, DeepSpeed stages,
export, inference.py on every held-out record, checker, table).

The first test runs all three stages with a handful of steps and checks that every step runs and connects. The
second runs a shortened demo (stage 1 only, a few minutes on 2 cores) and checks that the model has learned: its
held-out text-to-image colours and positions are well above the untrained baseline's.
"""

from __future__ import annotations

import importlib.util
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
        assert len([p for p in (out / "aligned" / "outputs" / task).iterdir() if p.is_file()]) == count, task
    # four draws of every prompt by default: draw 0 beside the other tasks' outputs, the others in sample<k>/
    for draw in (1, 2, 3):
        assert len(list((out / "aligned" / "outputs" / "t2i" / f"sample{draw}").iterdir())) == expected["t2i"]
    for folder in ("untrained", "aligned"):
        scores = json.loads((out / folder / "scores.json").read_text())
        assert list(scores) == list(METRICS) and all(0.0 <= value <= 1.0 for value in scores.values())
    # each stage started from the previous stage's EMA export
    stage3 = (out / "aligned" / "stage3_sft" / "config.py").read_text()
    assert str(out / "aligned" / "stage2_multitask" / "export" / "ema") in stage3

    # the guidance sweep samples the training split only: distinct one-object prompts and edit records
    sweep = out / "sweep"
    command = [
        sys.executable, "scripts/toy_guidance_sweep.py", "--model", str(out / "aligned" / "pipeline"),
        "--data", str(out / "world"), "--out", str(sweep), "--guidance", "1", "2.5", "--seeds", "0",
        "--prompts", "3", "--edits", "2", "--sample-steps", "2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| metric | guidance 1 | guidance 2.5 |" in result.stdout and "3 t2i, 2 edit" in result.stdout
    lines = [json.loads(line) for line in (sweep / "guidance2.5_seed0" / "jobs.jsonl").read_text().splitlines()]
    assert [line["task"] for line in lines] == ["t2i", "edit", "edit"]
    prompts = lines[0]["prompt"]
    train = read_split(out / "world", "train")
    assert len(set(prompts)) == 3 and all(" and " not in prompt for prompt in prompts)
    assert set(prompts) <= {record.prompt for record in train["t2i"]}
    assert not set(prompts) & {record.prompt for record in heldout["t2i"]}
    assert {line["image"] for line in lines[1:]} <= {record.source_images[0] for record in train["edit"]}
    assert len(list((sweep / "guidance1_seed0" / "outputs" / "t2i").iterdir())) == 3


def test_short_demo_learns_colours_and_positions_of_heldout_prompts(tmp_path):
    """Stage 1 only (960 of its 1200 steps) on the shapes world, given with --data as a user's folder would be, its
    held-out split cut to the text-to-image prompts so that the evaluation is quick. About 8 minutes on 2 cores."""
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


def _toy_demo_module():
    spec = importlib.util.spec_from_file_location("toy_demo", REPO / "scripts" / "toy_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stage_with_none_of_its_tasks_is_skipped_and_the_next_starts_from_the_last_trained(tmp_path):
    # A user's folder with text-to-image and questions only: stage 2 trains editing only, so it is skipped, and
    # stage 3 keeps the groups the folder has and starts from stage 1's export.
    toy_demo = _toy_demo_module()
    data, out = tmp_path / "data", tmp_path / "toy"
    (data / "train").mkdir(parents=True)
    for task in ("t2i", "vqa"):
        (data / "train" / f"{task}.jsonl").write_text("")
    variant = out / "aligned"
    common = dict(out=out, variant=variant, data_root=data, image_size=32, text_length=12, steps_scale=0.5)
    stage2 = toy_demo.stage_overrides("stage2_multitask", **common, no_alignment=False, previous="stage1_t2i_caption")
    assert stage2 is None
    stage3 = toy_demo.stage_overrides("stage3_sft", **common, no_alignment=True, previous="stage1_t2i_caption")
    assert [group["name"] for group in stage3["data.groups"]] == ["t2i", "vqa"]
    assert stage3["data.groups"][0]["datasets"][0]["path"] == str(data / "train" / "t2i.jsonl")
    assert stage3["model.load_from"] == str(variant / "stage1_t2i_caption" / "export" / "ema")
    assert stage3["model.config.sample_size"] == 8 and stage3["components.text_length"] == 12
    stage3_config = toy_demo.load_config(REPO / "configs" / "toy" / "stage3_sft.py")
    assert stage3["max_steps"] == round(stage3_config.max_steps * 0.5)  # --steps-scale 0.5
    # --no-alignment: both alignment losses off and no teacher loaded
    assert stage3["components.teacher"] is None and stage3["objective.weights.align_image"] == 0.0
