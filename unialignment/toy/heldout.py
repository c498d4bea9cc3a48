"""The demo's evaluation on a dataset folder's held-out split: jobs for `inference.py`, and their scores.

`write_jobs` turns every held-out record into an `inference.py --jobs` line (text-to-image prompts as one batched
job; one job per edit, perception map, composition, caption and question), each writing to a known file under the
outputs folder. That works for any dataset folder in the formats of docs/METHOD.md section 7. `score_outputs` then
reads the outputs back with `unialignment.toy.checker` against what the held-out records say, which only makes
sense for the shapes world: `checks_world` says whether a folder's texts speak its language.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from unialignment.data.records import Record
from unialignment.toy.checker import colours_in, find_objects, mask_iou, positions_in, shapes_in
from unialignment.toy.folder import read_split
from unialignment.toy.world import ShapeObject

# The table's rows, in order. t2i: the largest generated object has the prompt's colour / shape / position (a
# mean over every draw of every prompt).
# caption: names the image's colour and shape and no other. vqa: names exactly the true attribute(s). edits and
# composition: the output shows exactly the target's objects (colour, shape, position). perception: mean IoU of
# the predicted map with the true one.
METRICS = (
    "t2i colour",
    "t2i shape",
    "t2i position",
    "caption colour+shape",
    "vqa",
    "edit recolour",
    "edit move",
    "edit add",
    "edit remove",
    "composition",
    "perception mask IoU",
    "perception edges IoU",
)
EDIT_KINDS = {"make": "edit recolour", "move": "edit move", "add": "edit add", "remove": "edit remove"}


@dataclass(frozen=True)
class Job:
    """One held-out record (or a batch of prompts), the `inference.py` job line for it, and its output files."""

    task: str  # a key of the held-out split ("t2i", "edit", ...) or "caption"
    records: tuple[Record, ...]
    line: dict
    outputs: tuple[Path, ...]


def plan_jobs(
    data_root: str | Path,
    outputs: str | Path,
    seed: int = 0,
    text_steps: int | None = None,
    t2i_samples: int = 1,
) -> list[Job]:
    """One job per held-out record (all text-to-image prompts in one job), seeded; `text_steps` sets the sampling
    steps of the caption and VQA jobs (None: the command line's). With `t2i_samples` N > 1 the prompts are drawn N
    times: draw 0 as `t2i/NNNNN.png`, draw k (seed + k) as `t2i/sample<k>/NNNNN.png`; the text-to-image metrics
    are means over every draw."""
    return plan_jobs_for(read_split(data_root, "heldout"), outputs, seed, text_steps, t2i_samples)


def plan_jobs_for(
    split: dict[str, list[Record]],
    outputs: str | Path,
    seed: int = 0,
    text_steps: int | None = None,
    t2i_samples: int = 1,
) -> list[Job]:
    """`plan_jobs` for records already read (task -> records), e.g. a sample of the training split."""
    if t2i_samples < 1:
        raise ValueError(f"t2i_samples must be at least 1, got {t2i_samples}")
    outputs = Path(outputs).resolve()
    text_options = {} if text_steps is None else {"steps": text_steps}
    jobs = []
    for task, records in split.items():
        if task == "t2i":
            prompts = [record.prompt for record in records]
            for draw in range(t2i_samples):
                folder = outputs / "t2i" / (f"sample{draw}" if draw else "")
                files = tuple(folder / f"{i:05d}.png" for i in range(len(records)))
                line = {"task": "t2i", "prompt": prompts, "output": str(folder), "seed": seed + draw}
                jobs.append(Job("t2i", tuple(records), line, files))
        for i, record in enumerate(records):
            one = (record,)
            if task == "t2i":  # the held-out images are captioned too
                out = outputs / "caption" / f"{i:05d}.txt"
                line = {"task": "caption", "image": record.target_image, "output": str(out), "seed": seed + i}
                line.update(text_options)
                jobs.append(Job("caption", one, line, (out,)))
            elif task in ("edit", "perception"):
                out = outputs / task / f"{i:05d}.png"
                (source,) = record.source_images
                kind = "edit" if task == "edit" else "perception"
                line = {"task": kind, "image": source, "instruction": record.prompt, "output": str(out), "seed": seed}
                jobs.append(Job(task, one, line, (out,)))
            elif task == "composition":
                out = outputs / task / f"{i:05d}.png"
                line = {"task": "compose", "images": list(record.source_images), "instruction": record.prompt}
                jobs.append(Job(task, one, {**line, "output": str(out), "seed": seed}, (out,)))
            elif task == "vqa":
                out = outputs / task / f"{i:05d}.txt"
                question = record.question.replace("<image>", "").strip()
                line = {"task": "vqa", "image": record.target_image, "question": question, "output": str(out)}
                jobs.append(Job(task, one, {**line, "seed": seed + i, **text_options}, (out,)))
    return jobs


def write_jobs(jobs: list[Job], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(job.line) + "\n" for job in jobs), encoding="utf-8")
    return path


def objects_in(caption: str) -> list[ShapeObject] | None:
    """The objects a shapes-world caption states ("a large red square on the left and a ..."); None if a part
    does not name exactly one colour, shape and position."""
    objects = []
    for part in caption.split(" and "):
        colours, shapes, positions = colours_in(part), shapes_in(part), positions_in(part)
        if len(colours) != 1 or len(shapes) != 1 or len(positions) != 1:
            return None
        objects.append(ShapeObject(colours.pop(), shapes.pop(), positions.pop()))
    return objects


def checks_world(data_root: str | Path) -> bool:
    """Whether the built-in checker can score this folder: every held-out caption states shapes-world objects."""
    records = [record for rows in read_split(data_root, "heldout").values() for record in rows]
    return all(objects_in(record.caption) is not None for record in records if record.caption and not record.question)


def _same_objects(image: Image.Image, expected: list[ShapeObject]) -> bool:
    found = sorted((o.colour, o.shape, o.position) for o in find_objects(image))
    return found == sorted(o.triple for o in expected)


def score_outputs(jobs: list[Job]) -> dict[str, float]:
    """Each metric of `METRICS` that the jobs cover, as a mean over its samples. A missing output counts as a
    failure of its sample, never as a skip."""
    results: dict[str, list[float]] = {}

    def add(metric: str, value: float) -> None:
        results.setdefault(metric, []).append(float(value))

    for job in jobs:
        for record, output in zip(job.records, job.outputs, strict=True):
            exists = output.is_file()
            if job.task == "t2i":
                (truth,) = objects_in(record.prompt)
                found = find_objects(Image.open(output)) if exists else []
                main = found[0] if found else None
                for attribute in ("colour", "shape", "position"):
                    add(f"t2i {attribute}", main is not None and getattr(main, attribute) == getattr(truth, attribute))
            elif job.task == "caption":
                (truth,) = objects_in(record.caption)
                text = output.read_text(encoding="utf-8") if exists else ""
                add("caption colour+shape", colours_in(text) == {truth.colour} and shapes_in(text) == {truth.shape})
            elif job.task == "vqa":
                text = output.read_text(encoding="utf-8") if exists else ""
                add("vqa", exists and _attribute_words(text) == _attribute_words(record.caption))
            elif job.task == "edit":
                kind = EDIT_KINDS[record.prompt.split()[0].lower()]
                add(kind, exists and _same_objects(Image.open(output), objects_in(record.caption)))
            elif job.task == "composition":
                add("composition", exists and _same_objects(Image.open(output), objects_in(record.caption)))
            elif job.task == "perception":
                kind = "mask" if record.caption.startswith("the mask") else "edges"
                iou = mask_iou(Image.open(output), Image.open(record.target_image)) if exists else 0.0
                add(f"perception {kind} IoU", iou)
    return {metric: sum(values) / len(values) for metric in METRICS if (values := results.get(metric))}


def _attribute_words(text: str) -> tuple:
    return (sorted(colours_in(text)), sorted(shapes_in(text)), sorted(positions_in(text)))


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per metric, one column per model (e.g. untrained, trained)."""
    names = list(columns)
    metrics = [m for m in METRICS if any(m in column for column in columns.values())]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        cells = [f"{columns[name][metric]:.2f}" if metric in columns[name] else "" for name in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_seed_table(per_seed: list[dict[str, dict[str, float]]], columns: tuple[str, str, str]) -> str:
    """A markdown table over seeds: one row per metric, each column `mean ± std` (sample standard deviation) of a
    model's score, then the paired difference of the second and third columns, seed by seed (e.g. aligned minus
    no alignment, which share a seed's world and components), also as `mean ± std`. `per_seed[k][column][metric]`
    are the scores."""
    first, second, third = columns
    metrics = [m for m in METRICS if all(m in run[column] for run in per_seed for column in columns)]
    header = f"| metric | {first} | {second} | {third} | {second} - {third} |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for metric in metrics:
        cells = [_mean_std([run[column][metric] for run in per_seed]) for column in columns]
        cells.append(_mean_std([run[second][metric] - run[third][metric] for run in per_seed], signed=True))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float], signed: bool = False) -> str:
    """ "mean ± sample standard deviation" (just the mean for a single value)."""
    mean = sum(values) / len(values)
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if len(values) > 1:
        std = (sum((value - mean) ** 2 for value in values) / (len(values) - 1)) ** 0.5
        text += f" ± {std:.2f}"
    return text
