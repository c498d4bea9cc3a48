"""SemGen-Bench: the benchmark file and the generation of its outputs (the judge: semgen_judge.py, the scores and
the report: semgen_scores.py).

SemGen-Bench comes with UniAlignment (Song et al. 2025, arXiv:2509.23760; docs/METHOD.md section 8): 150 images
with four tasks each, two text-to-image (`t2i_long`, `t2i_complex`) and two edits of the image (`edit_multi`,
`edit_complex`), 600 outputs in all. Generation follows the paper: 512 px, 50 steps, guidance 7.0 for text-to-image
and 9.0 for edits. A VLM judge (the authors used Qwen2.5-VL-72B-Instruct-AWQ) rates semantic consistency (SC) and
perceptual quality (PQ) from 0 to 10, each the minimum of its sub-scores; overall = sqrt(SC * PQ) per sample,
averaged per task, then over the four tasks. The judge's questions here are our own wording.

The benchmark file, `semgen_bench.jsonl`, holds one object per image: `image_id` (an integer: the sample key and
the image's name, `images/<image_id>.jpg` beside the file), `image_path` (the authors' own path, unused), and one
text per task: the prompts `t2i_long` and `t2i_complex`, the instructions `edit_multi` and `edit_complex`.
Outputs go to `OUT/METHOD/fullset/<task>/<key>.png`, the judge's scores to `OUT/METHOD/semgen_scores.csv`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from unialignment.data.transforms import IMAGE_ERRORS, load_image
from unialignment.files import atomic_path

TASKS = ("t2i_long", "t2i_complex", "edit_multi", "edit_complex")
EDIT_TASKS = frozenset({"edit_multi", "edit_complex"})
BENCH_FILE = "semgen_bench.jsonl"
IMAGE_FOLDER = "images"
IMAGE_SUFFIX = ".jpg"
SIZE = 512
STEPS = 50
T2I_GUIDANCE = 7.0
EDIT_GUIDANCE = 9.0
DEFAULT_JUDGE = "Qwen2.5-VL-72B-Instruct-AWQ"
SCORES_FILE = "semgen_scores.csv"
SETTINGS_FILE = "generation.json"
# A key and a method name each name a file or folder.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_LISTED_PROBLEMS = 20
ANSWER_CHARS = 500  # of the judge's answer kept in the scores file


class BenchError(ValueError):
    """A bad benchmark file, output folder or scores file; the message says where (`FILE:LINE` for a line)."""


# --- the benchmark file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One of the benchmark's outputs: a task of one image."""

    task: str
    key: str
    text: str  # the prompt, or the edit instruction
    source: Path | None  # the image to edit; None for text-to-image
    where: str  # FILE:LINE of the image's line in the benchmark file

    @property
    def is_edit(self) -> bool:
        return self.source is not None


def bench_file(bench: str | Path) -> Path:
    """The benchmark file: `bench` itself, or `semgen_bench.jsonl` in the folder `bench`."""
    bench = Path(bench)
    path = bench if bench.is_file() else bench / BENCH_FILE
    if not path.is_file():
        raise BenchError(f"no benchmark file {path}: give the folder holding {BENCH_FILE} and {IMAGE_FOLDER}/")
    return path


def read_bench(bench: str | Path) -> list[Sample]:
    """Every sample, task by task in `TASKS` order and in file order within a task. Every line is checked, and
    every source image must exist, before anything runs: all problems are raised together, one per line."""
    path = bench_file(bench)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BenchError(f"{path} is not a UTF-8 text file: {error}") from None
    problems, images, first_line_of = [], [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            key, texts = _parse_line(line)
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        if key in first_line_of:
            problems.append(f"{where}: image_id {key} again (first at line {first_line_of[key]})")
            continue
        first_line_of[key] = number
        source = path.parent / IMAGE_FOLDER / f"{key}{IMAGE_SUFFIX}"
        if not source.is_file():
            problems.append(f"{where}: image not found: {source}")
            continue
        images.append((key, texts, source, where))
    if problems:
        listed = "\n".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise BenchError(f"{len(problems)} bad line(s) in the benchmark:\n{listed}{more}")
    if not images:
        raise BenchError(f"{path} holds no samples")
    return [
        Sample(task, key, texts[task], source if task in EDIT_TASKS else None, where)
        for task in TASKS
        for key, texts, source, where in images
    ]


def _parse_line(line: str) -> tuple[str, dict[str, str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    image_id = record.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, int | str):
        raise ValueError(f"image_id must be an integer or a string, got {image_id!r}")
    key = str(image_id)
    if not NAME_PATTERN.fullmatch(key):
        raise ValueError(f"image_id {key!r} cannot name a file")
    texts = {}
    for task in TASKS:
        text = record.get(task)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{task} must be a non-empty string, got {text!r}")
        texts[task] = text
    return key, texts


def shard(samples: Sequence[Sample], index: int, count: int) -> list[Sample]:
    """Shard `index` of `count`: every count-th sample from the index-th. Shards are disjoint and together hold
    every sample; the interleaving gives each a like share of every task. The split does not look at what is
    already done, so shards started at different times never share a sample."""
    if count < 1 or not 0 <= index < count:
        raise BenchError(f"shard {index} of {count}: need 0 <= shard < num_shards")
    return list(samples[index::count])


def shard_from_environment(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(shard, num_shards) from torchrun's RANK (else LOCAL_RANK) and WORLD_SIZE; (0, 1) outside a launcher."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    rank = int(environ.get("RANK", environ.get("LOCAL_RANK", "0")))
    return rank, world_size


# --- generation -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """What decides the outputs besides the model. Defaults are the benchmark's (docs/METHOD.md section 8)."""

    size: int = SIZE
    steps: int = STEPS
    t2i_guidance: float = T2I_GUIDANCE
    edit_guidance: float = EDIT_GUIDANCE
    seed: int = 0

    def guidance(self, sample: Sample) -> float:
        return self.edit_guidance if sample.is_edit else self.t2i_guidance


def method_folder(out: str | Path, method: str) -> Path:
    if not NAME_PATTERN.fullmatch(method):
        raise BenchError(f"method {method!r} cannot name a folder: use letters, digits, '_', '-' and '.'")
    return Path(out) / method


def output_path(fullset: Path, sample: Sample) -> Path:
    """Where a sample's output goes: `<fullset>/<task>/<key>.png`."""
    return fullset / sample.task / f"{sample.key}.png"


def sample_seed(sample: Sample, base_seed: int = 0) -> int:
    """The sample's seed: a function of its task and key alone, so an output is the same in any shard, batch or
    order, and a resumed run makes what the first run would have made."""
    return base_seed + zlib.crc32(f"{sample.task}/{sample.key}".encode())


def check_settings(method_dir: Path, settings: GenerationSettings) -> None:
    """Record `settings` beside the outputs, or check them against those recorded: a resumed run must not mix
    outputs made at another size, step count, guidance or seed into one result."""
    path = method_dir / SETTINGS_FILE
    wanted = dataclasses.asdict(settings)
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != wanted:
            raise BenchError(
                f"{method_dir} holds outputs made with {recorded}, not {wanted}; give another --method or --out"
            )
        return
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(wanted, indent=2) + "\n"))


def pending(samples: Iterable[Sample], fullset: Path) -> list[Sample]:
    """The samples whose output file is not there yet (a killed run leaves only whole files under final names)."""
    return [sample for sample in samples if not output_path(fullset, sample).is_file()]


def generate(
    pipe,
    samples: Sequence[Sample],
    fullset: Path,
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 4,
    progress: bool = True,
) -> int:
    """Make the outputs of `samples` that are not there yet, `batch_size` at a time; returns how many it wrote.

    Every output has its own generator seeded by `sample_seed`, and the pipeline gives a batch with one generator
    per image what it gives one image at a time, so an output does not depend on batch size or shard. Edit
    sources are resized and centre-cropped to the output size by the pipeline, as in training.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    todo = pending(samples, fullset)
    # One task per batch: a batch is one pipeline call, with one guidance scale.
    batches = [
        batch for task in TASKS for batch in _chunks([sample for sample in todo if sample.task == task], batch_size)
    ]
    written = 0
    for batch in tqdm(batches, desc="SemGen-Bench", unit="batch", disable=not progress):
        common = dict(
            height=settings.size,
            width=settings.size,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance(batch[0]),
            generator=[torch.Generator().manual_seed(sample_seed(sample, settings.seed)) for sample in batch],
        )
        texts = [sample.text for sample in batch]
        if batch[0].is_edit:
            sources = [load_rgb(sample.source, sample.where) for sample in batch]
            images = pipe.edit(sources, texts, **common).images
        else:
            images = pipe.text_to_image(texts, **common).images
        for sample, image in zip(batch, images, strict=True):
            write_atomically(output_path(fullset, sample), lambda temporary, image=image: image.save(temporary, "PNG"))
            written += 1
    return written


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def load_rgb(path: Path, where: str = "") -> Image.Image:
    try:
        return load_image(path)  # decoded now, so a broken file fails here
    except IMAGE_ERRORS as error:
        prefix = f"{where}: " if where else ""
        raise BenchError(f"{prefix}cannot read image {path}: {error}") from None


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary)`, then the rename (`atomic_path`): `path` is whole or absent, even if the run is killed."""
    with atomic_path(path) as temporary:
        write(temporary)
