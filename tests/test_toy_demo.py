"""The built-in demo end to end: the same command as `bash scripts/demo.sh` (world, components, DeepSpeed stages,
export, inference.py on every held-out record, checker, table).

The first test runs the four stages of `--full` with a handful of steps and checks that every step runs and
connects and that every held-out task is sampled and scored. The
second runs a shortened demo (stage 1 and `--full`'s perception-and-composition stage) and checks that the model
has learned: its held-out text-to-image colours and positions, perception masks and compositions are well above
the untrained baseline's.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from unialignment.data.feature_cache import cache_folder
from unialignment.toy.components import dataset_image_size
from unialignment.toy.folder import read_split
from unialignment.toy.heldout import METRICS

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_and_scores_every_task(tmp_path):
    out = tmp_path / "toy"
    command = [
        sys.executable, "scripts/toy_demo.py", "--out", str(out), "--full",
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
    # text-to-image at --guidance (given on the command line), every task with source images at --edit-guidance
    lines = [json.loads(line) for line in (out / "aligned" / "heldout_jobs.jsonl").read_text().splitlines()]
    guidance = {(line["task"], line.get("guidance")) for line in lines}
    assert guidance == {("t2i", None), ("caption", None), ("vqa", None), ("edit", 2.0), ("perception", 2.0),
                        ("compose", 2.0)}  # fmt: skip
    # each stage started from the previous stage's EMA export
    stage4 = (out / "aligned" / "stage4_sft_every_task" / "config.py").read_text()
    assert str(out / "aligned" / "stage3_perception_composition" / "export" / "ema") in stage4
    # and read the frozen components' outputs from the float32 cache beside each training file it uses, cached once
    assert "use_feature_cache=True" in stage4
    assert result.stdout.count(" scripts/cache_features.py ") == 1
    for task in ("t2i", "edit", "vqa", "perception", "composition"):
        meta = cache_folder(out / "world" / "train" / f"{task}.jsonl", dataset_image_size(out / "world")) / "meta.json"
        assert json.loads(meta.read_text())["storage_dtype"] == "torch.float32", task

    # the guidance sweep samples the training split only: distinct one-object prompts and edit records
    sweep = out / "sweep"
    command = [
        sys.executable, "scripts/toy_guidance_sweep.py", "--model", str(out / "aligned" / "pipeline"),
        "--data", str(out / "world"), "--out", str(sweep), "--guidance", "1", "2.5", "--seeds", "0",
        "--prompts", "3", "--edits", "2", "--maps", "1", "--compositions", "1", "--sample-steps", "2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| metric | guidance 1 | guidance 2.5 |" in result.stdout
    assert "3 t2i, 2 edit, 1 perception, 1 composition" in result.stdout
    lines = [json.loads(line) for line in (sweep / "guidance2.5_seed0" / "jobs.jsonl").read_text().splitlines()]
    assert [line["task"] for line in lines] == ["t2i", "edit", "edit", "perception", "compose"]
    assert all(line["guidance"] == 2.5 for line in lines[1:])  # the swept scale for every task with sources
    prompts = lines[0]["prompt"]
    train = read_split(out / "world", "train")
    assert len(set(prompts)) == 3 and all(" and " not in prompt for prompt in prompts)
    assert set(prompts) <= {record.prompt for record in train["t2i"]}
    assert not set(prompts) & {record.prompt for record in heldout["t2i"]}
    assert {line["image"] for line in lines[1:3]} <= {record.source_images[0] for record in train["edit"]}
    assert {line["image"] for line in lines[3:4]} <= {record.source_images[0] for record in train["perception"]}
    assert len(list((sweep / "guidance1_seed0" / "outputs" / "t2i").iterdir())) == 3


def test_short_demo_learns_heldout_prompts_perception_maps_and_compositions(tmp_path):
    """Stage 1 (960 of its 1200 steps), then the `--full` perception-and-composition stage for 1000 steps, on the shapes
    world given with --data as a user's folder would be. Its editing records are left out, so the editing stage
    is skipped and the next starts from stage 1, and its held-out split is cut to the text-to-image prompts,
    perception maps and compositions so that the evaluation is quick. 16-19 minutes on 2 cores."""
    data = tmp_path / "world"
    subprocess.run([sys.executable, "scripts/make_toy_world.py", "--out", str(data)], cwd=REPO, check=True)
    for split, task in (("train", "edit"), ("heldout", "edit"), ("heldout", "vqa")):
        (data / split / f"{task}.jsonl").unlink()
    out = tmp_path / "toy"
    command = [
        sys.executable, "scripts/toy_demo.py", "--data", str(data), "--out", str(out), "--full", "--stages", "3",
        "--stage-steps", "stage1_t2i_caption=960", "stage3_perception_composition=1000",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "skipping stage2_multitask" in result.stdout
    assert "teacher caption retrieval on the held-out pairs" in result.stdout
    untrained = json.loads((out / "untrained" / "scores.json").read_text())
    trained = json.loads((out / "aligned" / "scores.json").read_text())
    assert set(trained) == {
        "t2i colour", "t2i shape", "t2i position", "caption colour+shape",
        "composition", "perception mask IoU", "perception edges IoU",
    }  # fmt: skip
    # held-out prompts, maps and compositions show colour-shape-position combinations that no training image shows.
    # Measured on the stage-1 model of this run with --full's 16 heads of 8: after 1000 steps mask IoU 0.08 -> 0.76
    # and compositions 0.00 -> 0.12 (3 of 24 exactly right; with 8 heads of 16, 4 of 24, and 2 of 24 after 600
    # steps), so at least 2 of 24 are asked for. On another CPU (AVX-512, unpadded heads): mask 0.08 -> 0.78,
    # compositions 4 of 24.
    gains = {"t2i colour": 0.3, "t2i position": 0.3, "perception mask IoU": 0.4, "composition": 2 / 24}
    for metric, gain in gains.items():
        assert trained[metric] >= untrained[metric] + gain - 1e-9, (metric, untrained, trained)


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


def test_full_mode_adds_the_perception_and_composition_stages_after_the_first_two(tmp_path):
    toy_demo = _toy_demo_module()
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for task in ("t2i", "edit", "vqa", "perception", "composition"):
        (data / "train" / f"{task}.jsonl").write_text("")
    args = toy_demo.parse_args(
        ["--full", "--data", str(data), "--seed", "3", "--stage-steps", "stage4_sft_every_task=7"]
    )
    assert args.out == Path("runs/toy_full") and args.stages == 4
    out = tmp_path / "toy"
    plan = toy_demo.plan_stages(args, out, data, image_size=64, text_length=16)
    assert list(plan) == list(toy_demo.FULL_STAGES)
    assert plan["stage4_sft_every_task"]["max_steps"] == 7
    assert (
        plan["stage1_t2i_caption"]["max_steps"]
        == toy_demo.load_config(REPO / "configs/toy/stage1_t2i_caption.py").max_steps
    )
    assert list(toy_demo.FULL_STAGES[:2]) == list(toy_demo.STAGES[:2])  # the default's first two configs
    groups = {stage: [group["name"] for group in settings["data.groups"]] for stage, settings in plan.items()}
    assert {"perception", "composition"} <= set(groups["stage3_perception_composition"])
    assert set(groups["stage4_sft_every_task"]) == {"t2i", "edit", "vqa", "perception", "composition"}
    for previous, stage in zip(toy_demo.FULL_STAGES, toy_demo.FULL_STAGES[1:], strict=False):
        assert plan[stage]["model.load_from"] == str(out / "aligned" / previous / "export" / "ema")
    assert all(settings["seed"] == 3 for settings in plan.values())  # --seed reaches the training too
    assert all(settings.items() >= toy_demo.FULL_MODEL.items() for settings in plan.values())  # 16 heads of 8 in each
    # the default mode trains neither task
    default = toy_demo.plan_stages(toy_demo.parse_args(["--data", str(data)]), out, data, 64, 16)
    assert not {"perception", "composition"} & {g["name"] for s in default.values() for g in s["data.groups"]}
    assert not any(key in settings for settings in default.values() for key in toy_demo.FULL_MODEL)
    assert not any("speed.pad_narrow_heads" in settings for settings in default.values())
    # every task file the stages train, named and cached once for all of them
    assert toy_demo.trained_tasks(plan) == ["t2i", "edit", "perception", "composition", "vqa"]
    assert toy_demo.trained_tasks(default) == ["t2i", "edit", "vqa"]
    cached = toy_demo.every_training_file(plan)
    assert [group["datasets"] for group in cached] == [
        [dict(path=str(data / "train" / f"{task}.jsonl"), task=task)]
        for task in ("t2i", "edit", "perception", "composition", "vqa")
    ]
    padded = toy_demo.plan_stages(
        toy_demo.parse_args(["--full", "--pad-narrow-heads", "--data", str(data)]), out, data, 64, 16
    )
    assert all(settings["speed.pad_narrow_heads"] is True for settings in padded.values())


def test_the_heldout_tasks_sampled_are_those_the_stages_train(tmp_path, monkeypatch):
    toy_demo = _toy_demo_module()
    data = tmp_path / "world"
    subprocess.run([sys.executable, "scripts/make_toy_world.py", "--out", str(data)], cwd=REPO, check=True)
    heldout = read_split(data, "heldout")
    sampled = []
    monkeypatch.setattr(toy_demo, "infer", lambda jobs, *rest: sampled.append(jobs))
    everything = {"t2i", "caption", "edit", "vqa", "perception", "composition"}
    modes = {"": everything - {"perception", "composition"}, "--full": everything, "--quick": {"t2i", "caption"}}
    for mode, expected in modes.items():
        args = toy_demo.parse_args([mode, "--data", str(data)] if mode else ["--data", str(data)])
        args.trained_tasks = toy_demo.trained_tasks(toy_demo.plan_stages(args, tmp_path / "toy", data, 64, 16))
        jobs = toy_demo.evaluate(tmp_path / "pipeline", data, tmp_path / f"eval{mode}", args, 64, 16)
        assert sampled[-1] == jobs and {job.task for job in jobs} == expected, mode
        for task in expected - {"caption"}:  # every record of a trained task, text-to-image once per draw
            draws = args.t2i_samples if task == "t2i" else 1
            assert sum(len(job.records) for job in jobs if job.task == task) == draws * len(heldout[task]), mode
        note = toy_demo.unsampled_tasks_note(args, data)
        if mode == "--full":
            assert note is None
        else:
            left_out = ", ".join(task for task in heldout if task not in expected)
            assert note.startswith(f"held-out {left_out}: no stage of this run trains them"), note
            assert note.endswith("(bash scripts/demo.sh --full trains every task)")


def test_seeds_run_both_variants_per_seed_in_its_own_folder_and_summarise(tmp_path, monkeypatch):
    toy_demo = _toy_demo_module()
    runs = []

    def fake_demo(args):  # the scores a seed's second run returns: all three columns
        runs.append((args.seed, args.no_alignment, args.out, args.seeds))
        value = 0.5 + 0.1 * args.seed
        return {"untrained": {"vqa": 0.1}, "aligned": {"vqa": value}, "no_alignment": {"vqa": value - 0.05}}

    monkeypatch.setattr(toy_demo, "run_demo", fake_demo)
    out = tmp_path / "ablation"
    toy_demo.main(["--seeds", "2", "--out", str(out)])
    assert runs == [
        (0, False, out / "seed_0", 0),
        (0, True, out / "seed_0", 0),
        (1, False, out / "seed_1", 0),
        (1, True, out / "seed_1", 0),
    ]
    # seeds 0 and 1: aligned 0.5, 0.6 -> 0.55 ± 0.07; differences 0.05, 0.05 -> +0.05 ± 0.00
    assert "| vqa | 0.10 ± 0.00 | 0.55 ± 0.07 | 0.50 ± 0.07 | +0.05 ± 0.00 |" in (out / "seeds.md").read_text()


def test_stage_steps_names_a_stage_of_the_mode(capsys):
    toy_demo = _toy_demo_module()
    with pytest.raises(SystemExit):
        toy_demo.parse_args(["--stage-steps", "stage4_sft_every_task=10"])  # a --full stage, without --full
    assert "'stage4_sft_every_task' is not one of this mode's stages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_demo.parse_args(["--stage-steps", "stage1_t2i_caption=ten"])
    assert "STEPS must be a positive whole number" in capsys.readouterr().err
