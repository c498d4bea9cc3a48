"""The built-in small default end to end: data, tiny components, the training stages, export, inference on the
held-out split, and a table scored against an untrained baseline. `bash scripts/demo.sh` runs it.

    python scripts/toy_demo.py                      # the shapes world, every loss term (19-25 minutes by machine)
    python scripts/toy_demo.py --full               # also perception maps and compositions (45-59 minutes by machine)
    python scripts/toy_demo.py --no-alignment       # the same without the two alignment losses (and no teacher)
    python scripts/toy_demo.py --seeds 3            # both variants over seeds 0, 1, 2: mean and spread per metric
    python scripts/toy_demo.py --data DIR           # any dataset folder: DIR/train/*.jsonl, DIR/heldout/*.jsonl

Each step is one of the project's own commands, printed before it runs: `scripts/make_toy_world.py`,
`scripts/make_toy_components.py`, `scripts/cache_features.py` once for every stage's training files,
`train_unialignment.sh configs/toy/<stage>.py` (DeepSpeed) once per stage (STAGES, or FULL_STAGES with --full), each
from the previous one's EMA export, `scripts/export_pipeline.py`, and `inference.py --jobs` on every held-out record
of the tasks those stages train (the default's stages train neither perception maps nor compositions, so it does
not sample them). Everything lands under OUT (default runs/toy, runs/toy_full with --full): world/, components/,
untrained/, and one folder per variant (aligned/ or no_alignment/) with a run per stage, the exported pipeline,
outputs/ and scores.md. With --seeds N, each seed has such a folder, OUT/seed_<k>/.

For the shapes world, the built-in checker (`unialignment.toy.checker`) scores the outputs; the table shows the
untrained model beside the trained one (and beside the other variant, once both have run). For another dataset
folder the outputs are written for the user's own checker: OUT/<variant>/outputs/<task>/NNNNN.png|txt, numbered
in the order of the held-out JSONL lines (text-to-image and captions both follow heldout/t2i.jsonl); the further
draws of each prompt (--t2i-samples) are in outputs/t2i/sample1/, sample2/, ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from unialignment.frozen.text_encoder import load_t5_tokenizer
from unialignment.pipelines.assembly import build_pipeline, save_pipeline
from unialignment.pipelines.jobs import IMAGE_TASKS
from unialignment.toy.components import dataset_image_size, dataset_text_length
from unialignment.toy.folder import DatasetFolderError, read_records, split_files
from unialignment.toy.heldout import (
    checks_world,
    format_seed_table,
    format_table,
    plan_jobs_for,
    score_outputs,
    write_jobs,
)
from unialignment.training.builders import build_transformer
from unialignment.training.config import load_config

REPO = Path(__file__).resolve().parent.parent
STAGES = ("stage1_t2i_caption", "stage2_multitask", "stage3_sft")
# --full: every task of the world, perception maps and compositions included.
FULL_STAGES = ("stage1_t2i_caption", "stage2_multitask", "stage3_perception_composition", "stage4_sft_every_task")
# --full's model, in every stage (a stage loads the previous one's export, so all share the architecture): the same
# width 128 and parameters as the default's, as 16 heads of 8 instead of 8 of 16. Chosen on training records (seeds 0
# and 1; 192 edits, 96 maps, 192 compositions) after all four stages: recolour 0.84 -> 0.93, move 0.69 -> 0.72, add
# 0.45 -> 0.66, remove 0.80 -> 0.91, mask 0.87 -> 0.89, edges 0.54 -> 0.59, composition 0.71 -> 0.69, text-to-image
# within 0.01. Its steps cost about 30% more on 2 cores (after unialignment.models.attention pads its heads on CPU).
FULL_MODEL = {"model.config.num_attention_heads": 16, "model.config.attention_head_dim": 8}
VARIANTS = {False: "aligned", True: "no_alignment"}
# inference.py tasks that copy source images, sampled with --edit-guidance (text-to-image with --guidance)
SOURCE_TASKS = tuple(task for task in IMAGE_TASKS if task != "t2i")
# --quick, the README's first command: what it shortens (its one stage trains, and so the demo evaluates, the held-out
# text-to-image prompts and captions only).
QUICK = {"steps_scale": 0.5, "vae_steps": 1500}
ALIGNMENT_OFF = {
    "objective.weights.contrastive": 0.0,
    "objective.weights.align_image": 0.0,
    "objective.weights.align_text": 0.0,
    "components.teacher": None,
}


def run(command: list[str], log: Path | None = None) -> None:
    """Run one of the project's commands from the repository root; with `log`, its output goes there."""
    print("+ " + shlex.join(command) + (f" > {log}" if log else ""), flush=True)
    if log is None:
        subprocess.run(command, check=True, cwd=REPO)
        return
    with open(log, "w") as sink:
        if subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT).returncode:
            sys.exit(f"failed: {shlex.join(command)}; its output is in {log}")


def stage_overrides(
    stage: str,
    out: Path,
    variant: Path,
    data_root: Path,
    image_size: int,
    text_length: int,
    steps_scale: float,
    no_alignment: bool,
    previous: str | None,
    seed: int = 0,
) -> dict | None:
    """The stage config's data and component paths pointed at this demo's folders, starting from the EMA export of
    the `previous` stage (None: from scratch). Groups whose files the dataset lacks are dropped; a stage with none
    left returns None (the demo skips it)."""
    config = load_config(REPO / "configs" / "toy" / f"{stage}.py")
    train = split_files(data_root, "train")
    groups = []
    for group in config.data.groups:
        datasets = [dict(d, path=str(train[d["task"]])) for d in group["datasets"] if d["task"] in train]
        if datasets:
            groups.append(dict(group, datasets=datasets))
    if not groups:
        return None
    components = out / "components"
    overrides = {
        "work_dir": str(variant / stage),
        "data.groups": groups,
        "data.resolution": image_size,
        "model.config.sample_size": image_size // 4,  # the tiny VAE downsamples 4x
        "components.tokenizer": str(components / "tokenizer"),
        "components.text_encoder": str(components / "text_encoder"),
        "components.vae": str(components / "vae"),
        "components.teacher": str(components / "teacher"),
        "components.text_length": text_length,
        "max_steps": max(1, round(config.max_steps * steps_scale)),
        "seed": seed,
    }
    # labelled sample grids of the untrained start and of the stage's end (samples/<step>/t2i.png)
    overrides["logging.sample_every_steps"] = overrides["max_steps"]
    if previous is not None:
        overrides["model.load_from"] = str(variant / previous / "export" / "ema")
    if no_alignment:
        overrides.update(ALIGNMENT_OFF)
    return overrides


def as_arguments(overrides: dict) -> list[str]:
    """`--key=value` for scripts/train.py, whose values are Python literals (JSON's lists and dicts are too)."""

    def literal(value) -> str:
        return value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else repr(value)

    return [f"--{key}={literal(value)}" for key, value in overrides.items()]


def make_untrained_pipeline(out: Path, stage: str, overrides: dict) -> Path:
    """The first trained stage's model at its initial weights (the trainer's seed and construction, as if that stage
    started from scratch) with the stage's frozen components and text length, saved as a pipeline."""
    pipeline = out / "untrained" / "pipeline"
    if (pipeline / "model_index.json").is_file():
        return pipeline
    config = load_config(REPO / "configs" / "toy" / f"{stage}.py", {**overrides, "model.load_from": None})
    torch.manual_seed(config.seed)
    vocab_size = len(load_t5_tokenizer(config.components.tokenizer))
    model, _ = build_transformer(config, vocab_size)
    model.save_pretrained(out / "untrained" / "transformer")
    save_pipeline(build_pipeline(out / "untrained" / "transformer", config.components), pipeline, overwrite=True)
    print(f"untrained pipeline: {pipeline}", flush=True)
    return pipeline


def every_training_file(overrides: dict) -> list[dict]:
    """One data group per distinct training file of the planned stages, in the order they first appear: what
    scripts/cache_features.py caches once for all of them."""
    datasets = {}
    for stage in overrides.values():
        for group in stage["data.groups"]:
            datasets.update((dataset["path"], dataset) for dataset in group["datasets"])
    return [dict(name=Path(path).stem, weight=1, datasets=[dataset]) for path, dataset in datasets.items()]


def trained_tasks(overrides: dict) -> list[str]:
    """The tasks of the planned stages' training files, in the order they first appear (t2i records also train
    captioning)."""
    return list(dict.fromkeys(group["datasets"][0]["task"] for group in every_training_file(overrides)))


def unsampled_tasks_note(args: argparse.Namespace, data_root: Path) -> str | None:
    """The line that names the held-out task files no stage of this run trains (None when every one is trained)."""
    untrained = [task for task in split_files(data_root, "heldout") if task not in args.trained_tasks]
    if not untrained:
        return None
    hint = "" if args.full else " (bash scripts/demo.sh --full trains every task)"
    return f"held-out {', '.join(untrained)}: no stage of this run trains them, so they are not sampled or scored{hint}"


def evaluate(
    pipeline: Path, data_root: Path, folder: Path, args: argparse.Namespace, image_size: int, text_length: int
):
    """Run the held-out jobs of the trained tasks (`args.trained_tasks`: those of the stages run) through
    inference.py; returns the jobs (with their output files). A task no stage trains is not sampled: its rows would
    only show the untrained model twice."""
    files = split_files(data_root, "heldout")
    split = {task: read_records(path, task) for task, path in files.items() if task in args.trained_tasks}
    jobs = plan_jobs_for(
        split, folder / "outputs", seed=args.seed, text_steps=args.text_steps, t2i_samples=args.t2i_samples
    )
    infer(jobs, folder / "heldout_jobs.jsonl", pipeline, args, image_size, text_length)
    return jobs


def infer(jobs: list, jobs_file: Path, pipeline: Path, args: argparse.Namespace, image_size: int, text_length: int):
    """Write `jobs` to `jobs_file` and run them through inference.py (log beside the jobs file), with the sampling
    settings of `args`: sample_steps, guidance (text-to-image) and edit_guidance (every task with source images:
    edits, perception maps, compositions)."""
    with_sources = [
        replace(job, line={**job.line, "guidance": args.edit_guidance}) if job.line["task"] in SOURCE_TASKS else job
        for job in jobs
    ]
    jobs_file = write_jobs(with_sources, jobs_file)
    run(
        [
            sys.executable, "inference.py", "--model", str(pipeline), "--jobs", str(jobs_file), "--batch-size", "32",
            "--device", "cpu", "--dtype", "float32", "--size", str(image_size), "--steps", str(args.sample_steps),
            "--guidance", str(args.guidance), "--length", str(text_length),
        ],
        log=jobs_file.parent / "inference.log",
    )  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a dataset folder (train/, heldout/); default: make the shapes world")
    parser.add_argument("--out", type=Path, help="where everything goes (default runs/toy; --quick: runs/toy_quick)")
    parser.add_argument("--no-alignment", action="store_true", help="train without the alignment losses")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's max_steps")
    parser.add_argument("--stages", type=int, help="train the first N stages (default: every stage of the mode)")
    parser.add_argument(
        "--stage-steps",
        nargs="+",
        default=[],
        metavar="STAGE=STEPS",
        help="one stage's max_steps, instead of its config's times --steps-scale (e.g. stage2_multitask=1000)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="45-59 minutes by machine (59: a slower CPU, with --pad-narrow-heads): also train perception maps and "
        "compositions (configs/toy/stage3_perception_composition.py and stage4_sft_every_task.py after the "
        "default's first two stages), with 16 heads of 8 instead of 8 of 16 in every stage (FULL_MODEL)",
    )
    parser.add_argument(
        "--pad-narrow-heads",
        action="store_true",
        help="speed.pad_narrow_heads in every stage: the same attention, faster on CPUs where "
        "scripts/benchmark_attention.py shows a padded speed-up above 1x (--full's 8-wide heads only)",
    )
    parser.add_argument("--vae-steps", type=int, default=2000, help="most steps of the tiny VAE's training")
    parser.add_argument("--t5-steps", type=int, default=400, help="masked-token pretraining steps of the tiny T5")
    parser.add_argument("--teacher-steps", type=int, default=2000, help="image-caption steps of the tiny teacher")
    # The frozen components' outputs once per record (scripts/cache_features.py, float32) instead of once per step:
    # on the shapes world the same losses digit for digit (100 stage-2 steps compared) and the same held-out table as
    # encoding online, with steps about 10% faster on 2 CPU cores.
    parser.add_argument(
        "--no-feature-cache",
        dest="feature_cache",
        action="store_false",
        help="encode every batch with the frozen components online instead of caching them beside the data once "
        "(in hidden .<file>.features/ folders; a dataset folder the demo may not write to needs this)",
    )
    parser.add_argument("--sample-steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument(
        "--text-steps",
        type=int,
        default=64,
        help="masked-diffusion steps per caption and answer (docs/METHOD.md section 4: 64)",
    )
    # Chosen on training-split records, never the held-out ones (scripts/toy_guidance_sweep.py, 48 prompts and
    # 96 edits, 2 seeds): t2i colour 0.84 / 0.86 / 0.95 / 0.93 at guidance 1.5 / 2 / 3 / 4.5, recolour 0.58-0.66
    # from 1.5 to 6.
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance for text-to-image")
    # Chosen the same way (192 edits, 96 maps and 96 compositions of the training split): with a `--full` model,
    # guidance 1 / 1.5 / 2 / 3 gave move 0.45 / 0.61 / 0.60 / 0.50, add 0.15 / 0.32 / 0.39 / 0.33 (edits: mean of
    # seeds 0 and 1), composition 0.41 / 0.52 / 0.58 / 0.57 (seed 1), mask and edges IoU within 0.03; with a
    # default-demo model 1.5 / 2 / 3 were within 0.07 of each other on every edit row.
    parser.add_argument(
        "--edit-guidance",
        type=float,
        default=2.0,
        help="classifier-free guidance for the tasks with source images: edits, perception maps, compositions",
    )
    # 24 held-out prompts drawn once each move the colour score by 0.04 a prompt, and two runs of one recipe differed
    # by more than that; four draws a prompt (seeds seed .. seed+3) cost a few seconds.
    parser.add_argument(
        "--t2i-samples", type=int, default=4, help="draws per held-out text-to-image prompt (the metrics average them)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the world's, the components', training's and sampling's")
    parser.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="the ablation: both variants (every loss term, and no alignment) for seeds 0 .. N-1, each seed in "
        "OUT/seed_<k>/ with its own world and components, then each metric's mean and spread over the seeds",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: stage 1 at half length, a shorter VAE training, held-out text-to-image and captions only",
    )
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full are two lengths of the demo: give one")
    args.stage_names = FULL_STAGES if args.full else STAGES
    if args.stages is None:
        args.stages = len(args.stage_names)
    if not 1 <= args.stages <= len(args.stage_names):
        parser.error(f"--stages: between 1 and {len(args.stage_names)}")
    args.stage_steps = _stage_steps(parser, args.stage_steps, args.stage_names)
    # Its own folder: the full demo must not pick up the quick run's shorter-trained components, nor the default
    # demo's scores those of the other length.
    args.out = args.out or Path("runs/toy_quick" if args.quick else "runs/toy_full" if args.full else "runs/toy")
    if args.quick:
        args.stages, args.steps_scale = 1, args.steps_scale * QUICK["steps_scale"]
        args.vae_steps, args.t2i_samples = min(args.vae_steps, QUICK["vae_steps"]), min(args.t2i_samples, 2)
    return args


def _stage_steps(parser: argparse.ArgumentParser, items: list[str], stage_names: tuple[str, ...]) -> dict[str, int]:
    """--stage-steps STAGE=STEPS ... as {stage: steps}, every name a stage of the mode and every count positive."""
    steps = {}
    for item in items:
        name, _, count = item.partition("=")
        if name not in stage_names:
            parser.error(f"--stage-steps {item}: {name!r} is not one of this mode's stages {', '.join(stage_names)}")
        if not count.isdigit() or int(count) < 1:
            parser.error(f"--stage-steps {item}: STEPS must be a positive whole number")
        steps[name] = int(count)
    return steps


def plan_stages(args: argparse.Namespace, out: Path, data_root: Path, image_size: int, text_length: int) -> dict:
    """Each stage to train -> its config overrides; a stage whose tasks the dataset lacks is skipped."""
    variant = out / VARIANTS[args.no_alignment]
    overrides, previous = {}, None
    for stage in args.stage_names[: args.stages]:
        stage_settings = stage_overrides(
            stage,
            out,
            variant,
            data_root,
            image_size,
            text_length,
            args.steps_scale,
            args.no_alignment,
            previous,
            args.seed,
        )
        if stage_settings is None:
            print(f"skipping {stage}: {data_root / 'train'} has none of its tasks", flush=True)
            continue
        if args.full:
            stage_settings.update(FULL_MODEL)
        if args.pad_narrow_heads:
            stage_settings["speed.pad_narrow_heads"] = True
        if stage in args.stage_steps:
            stage_settings["max_steps"] = stage_settings["logging.sample_every_steps"] = args.stage_steps[stage]
        overrides[stage], previous = stage_settings, stage
    if not overrides:
        raise DatasetFolderError(f"{data_root}/train: no task file that any of the first {args.stages} stages trains")
    return overrides


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return run_seeds(args) if args.seeds else run_demo(args)


def run_demo(args: argparse.Namespace) -> dict:
    """One variant, one seed: returns the scores table's columns (empty for a folder the checker cannot score)."""
    started = time.monotonic()
    out = args.out.resolve()

    data_root = args.data.resolve() if args.data else out / "world"
    if args.data is None:
        run([sys.executable, "scripts/make_toy_world.py", "--out", str(data_root), "--seed", str(args.seed)])
    run([sys.executable, "scripts/make_toy_components.py", "--data", str(data_root), "--out", str(out / "components"),
         "--vae-steps", str(args.vae_steps), "--t5-steps", str(args.t5_steps),
         "--teacher-steps", str(args.teacher_steps), "--seed", str(args.seed)])  # fmt: skip
    image_size = dataset_image_size(data_root)
    text_length = dataset_text_length(data_root, load_t5_tokenizer(out / "components" / "tokenizer"))

    variant = out / VARIANTS[args.no_alignment]
    overrides = plan_stages(args, out, data_root, image_size, text_length)
    stages = list(overrides)
    args.last_stage, args.trained_tasks = stages[-1], trained_tasks(overrides)
    if note := unsampled_tasks_note(args, data_root):
        print(note, flush=True)

    untrained = make_untrained_pipeline(out, stages[0], overrides[stages[0]])
    baseline_jobs = evaluate(untrained, data_root, out / "untrained", args, image_size, text_length)
    if args.feature_cache:
        # Every stage's training files in one run (one process, not one a stage); files cached by an earlier demo
        # with the same components are kept (--skip-fresh). The first stage's settings (every stage has the same
        # components and sizes), as it starts from scratch: no stage's export exists yet.
        cached = as_arguments({**overrides[stages[0]], "data.groups": every_training_file(overrides)})
        run([sys.executable, "scripts/cache_features.py", f"configs/toy/{stages[0]}.py", *cached,
             "--storage-dtype", "float32", "--skip-fresh"])  # fmt: skip
    for stage in stages:
        arguments = as_arguments(overrides[stage])
        if args.feature_cache:
            arguments.append("--data.use_feature_cache=True")
        run(["bash", "train_unialignment.sh", f"configs/toy/{stage}.py", *arguments])
    pipeline = variant / "pipeline"
    run([sys.executable, "scripts/export_pipeline.py", "--run", str(variant / stages[-1]), "--out", str(pipeline),
         "--overwrite"])  # fmt: skip
    trained_jobs = evaluate(pipeline, data_root, variant, args, image_size, text_length)
    minutes = (time.monotonic() - started) / 60

    if not checks_world(data_root):
        print(f"outputs for the held-out split: {variant / 'outputs'} (the built-in checker scores only the shapes "
              f"world); {minutes:.1f} min")  # fmt: skip
        return {}
    return report(args, out, data_root, variant, baseline_jobs, trained_jobs, minutes)


def report(args, out: Path, data_root: Path, variant: Path, baseline_jobs, trained_jobs, minutes: float) -> dict:
    """Score both models' outputs, save the scores, and print the table (beside the other variant's, if run)."""
    scores = {"untrained": score_outputs(baseline_jobs), VARIANTS[args.no_alignment]: score_outputs(trained_jobs)}
    (out / "untrained" / "scores.json").write_text(json.dumps(scores["untrained"], indent=1))
    (variant / "scores.json").write_text(json.dumps(scores[VARIANTS[args.no_alignment]], indent=1))
    other = out / VARIANTS[not args.no_alignment] / "scores.json"
    if other.is_file():  # both variants have run: show them side by side
        scores[VARIANTS[not args.no_alignment]] = json.loads(other.read_text())
    table = format_table(scores)
    (variant / "scores.md").write_text(table + "\n")
    print(f"\nheld-out scores ({data_root / 'heldout'}), {minutes:.1f} min:\n{table}")
    grids = sorted(variant.glob(f"{args.last_stage}/samples/step_*/t2i.png"))
    if grids:
        print(f"labelled samples of {args.last_stage}, at its start and its end: {', '.join(map(str, grids))}")
    return scores


def run_seeds(args: argparse.Namespace) -> dict:
    """The ablation over `args.seeds` seeds: per seed, the aligned then the no-alignment variant on one world with
    one set of components (a seed draws the world, the components, the training and the sampling), so that the
    two variants of a seed differ only in the alignment losses. Writes OUT/seeds.md and returns the per-seed
    scores."""
    per_seed = []
    for seed in range(args.seeds):
        for no_alignment in (False, True):
            one_run = argparse.Namespace(**{**vars(args), "seeds": 0, "seed": seed, "no_alignment": no_alignment})
            one_run.out = args.out / f"seed_{seed}"
            print(f"\n=== seed {seed}, {VARIANTS[no_alignment]} ===", flush=True)
            scores = run_demo(one_run)
        per_seed.append(scores)  # the second run's table has all three columns
    if not per_seed[-1]:
        print(f"outputs of every seed and variant: {args.out}/seed_<k>/<variant>/outputs", flush=True)
        return {}
    table = format_seed_table(per_seed, ("untrained", *VARIANTS.values()))
    summary = f"held-out scores over seeds 0-{args.seeds - 1}: mean ± sample standard deviation\n{table}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.md").write_text(summary + "\n")
    print(f"\n{summary}\nper seed: {args.out}/seed_<k>/no_alignment/scores.md; this table: {args.out / 'seeds.md'}")
    return {"per_seed": per_seed}


if __name__ == "__main__":
    main()
