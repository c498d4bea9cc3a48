"""Choose the shapes-world demo's classifier-free guidance on the training split, never on the held-out one.

Takes a sample of the training split's one-object text-to-image prompts (distinct prompts), edit records, and
perception-map and composition records, runs them through inference.py with a trained pipeline at each guidance
scale and seed, scores them with the built-in checker and prints one column per guidance scale (means over the
seeds). The held-out table of `toy_demo.py` is only read after the choice; this is how its `--guidance` (the
text-to-image rows) and `--edit-guidance` (the rows of tasks with source images) defaults were chosen.

    python scripts/toy_guidance_sweep.py --model runs/toy/aligned/pipeline --data runs/toy/world
    python scripts/toy_guidance_sweep.py --model ... --data ... --guidance 1.5 2 3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from toy_demo import infer

from unialignment.frozen.text_encoder import load_t5_tokenizer
from unialignment.toy.components import dataset_image_size, dataset_text_length
from unialignment.toy.folder import DatasetFolderError, read_split
from unialignment.toy.heldout import Job, format_table, objects_in, plan_jobs_for, score_outputs


def validation_sample(
    data_root: Path, prompts: int, edits: int, seed: int = 0, maps: int = 0, compositions: int = 0
) -> dict[str, list]:
    """Up to `prompts` training records with distinct one-object prompts, and up to `edits` edit records, `maps`
    perception records and `compositions` composition records of the training split that the checker can score,
    drawn with `seed`."""
    split = read_split(data_root, "train")
    distinct = {}
    for record in split.get("t2i", []):
        stated = objects_in(record.prompt)
        if stated is not None and len(stated) == 1:
            distinct.setdefault(record.prompt, record)
    draw = random.Random(seed)
    sample = {"t2i": draw.sample(list(distinct.values()), min(prompts, len(distinct)))}
    for task, count in (("edit", edits), ("perception", maps), ("composition", compositions)):
        # a map's caption names its kind and its objects ("the mask of ..."), which the scores do not need
        scorable = [r for r in split.get(task, []) if task == "perception" or objects_in(r.caption) is not None]
        sample[task] = draw.sample(scorable, min(count, len(scorable)))
    sample = {task: records for task, records in sample.items() if records}
    if not sample:
        raise DatasetFolderError(f"{data_root}/train: no shapes-world record of the asked tasks to score")
    return sample


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported pipeline folder")
    parser.add_argument("--data", type=Path, required=True, help="the shapes-world folder the model was trained on")
    parser.add_argument("--out", type=Path, help="default: guidance_sweep/ beside the pipeline")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompts", type=int, default=48, help="distinct one-object training prompts")
    parser.add_argument("--edits", type=int, default=96, help="training edit records")
    parser.add_argument("--maps", type=int, default=0, help="training perception-map records")
    parser.add_argument("--compositions", type=int, default=0, help="training composition records")
    parser.add_argument("--sample-steps", type=int, default=20, help="denoising steps per image")
    args = parser.parse_args(argv)
    model, data = args.model.resolve(), args.data.resolve()
    out = (args.out or model.parent / "guidance_sweep").resolve()

    sample = validation_sample(data, args.prompts, args.edits, maps=args.maps, compositions=args.compositions)
    image_size = dataset_image_size(data)
    text_length = dataset_text_length(data, load_t5_tokenizer(model / "tokenizer"))
    columns = {}
    for guidance in args.guidance:
        scored: list[Job] = []
        for seed in args.seeds:
            folder = out / f"guidance{guidance:g}_seed{seed}"
            # images only: captions of the prompts' pictures do not depend on the guidance
            jobs = [job for job in plan_jobs_for(sample, folder / "outputs", seed=seed) if job.task != "caption"]
            settings = argparse.Namespace(sample_steps=args.sample_steps, guidance=guidance, edit_guidance=guidance)
            infer(jobs, folder / "jobs.jsonl", model, settings, image_size, text_length)
            scored += jobs
        # every seed scores the same records, so the pooled mean is the mean over seeds
        columns[f"guidance {guidance:g}"] = score_outputs(scored)
    counts = ", ".join(f"{len(records)} {task}" for task, records in sample.items())
    print(f"\ntraining-split scores ({counts}; mean over seeds {args.seeds}):\n{format_table(columns)}")
    return columns


if __name__ == "__main__":
    main()
