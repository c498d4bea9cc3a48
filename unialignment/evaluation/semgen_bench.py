"""SemGen-Bench: generate its outputs, score them with a VLM judge, report the per-task means.

SemGen-Bench comes with UniAlignment (Song et al. 2025, arXiv:2509.23760; SPEC section 8): 150 images with four
tasks each, two text-to-image (`t2i_long`, `t2i_complex`) and two edits of the image (`edit_multi`,
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

import csv
import dataclasses
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from unialignment.data.transforms import resize_and_center_crop
from unialignment.evaluation.vlm_judge import VLMJudge

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
    """What decides the outputs besides the model. Defaults are the benchmark's (SPEC section 8)."""

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
    _write_atomically(path, lambda temporary: temporary.write_text(json.dumps(wanted, indent=2) + "\n"))


def load_pipeline(model: str | Path, device: str | torch.device, dtype: torch.dtype):
    """A pipeline folder, or a training run folder's newest EMA export, on `device`."""
    # Imported here so that the report, and every argument check, run without loading diffusers.
    from unialignment.pipelines.from_run import load_pipeline as load_pipeline_folder

    return load_pipeline_folder(model, torch_dtype=dtype).to(device)


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
            _write_atomically(output_path(fullset, sample), lambda temporary, image=image: image.save(temporary, "PNG"))
            written += 1
    return written


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def load_rgb(path: Path, where: str = "") -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # decoded now, so a broken file fails here
    except (OSError, Image.DecompressionBombError) as error:
        prefix = f"{where}: " if where else ""
        raise BenchError(f"{prefix}cannot read image {path}: {error}") from None


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary name in `path`'s folder, then rename: `path` is whole or absent, even if the run
    is killed. The name holds the process id, so shards writing side by side never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --- the judge's questions and the reading of its answers -----------------------------------------------------------

# The judge's questions, in our own words. Each names its sub-scores and asks for them in a fixed JSON form, the
# reason first, so that the judge looks before it scores.
T2I_INTRO = "You are a strict judge of AI-generated images. This image was generated from the prompt:"
EDIT_INTRO = (
    "You are a strict judge of AI image editing. The first image is the original. The second image is the "
    "original edited by an AI model following the instruction:"
)
T2I_SC_ASKED = (
    (
        "elements",
        "every object, attribute, colour, count and piece of written text that the prompt names is there and correct "
        "(0 if the main subject is missing).",
    ),
    ("composition", "positions, relations, actions and the scene as a whole are as the prompt describes them."),
)
EDIT_SC_ASKED = (
    (
        "instruction",
        "every change the instruction asks for has been made, completely and in the right place (0 if none was).",
    ),
    (
        "preservation",
        "everything the instruction does not ask to change is as in the original (10 means no change that was not "
        "asked for).",
    ),
)
PQ_ASKED = (
    (
        "naturalness",
        "lighting, shadows, perspective and proportions hold together; it could be a real photograph or a deliberate "
        "piece of art.",
    ),
    (
        "artifacts",
        "free of distortion, malformed hands, faces or bodies, garbled lettering, smeared textures, noise and blur "
        "(10 means no flaw at all).",
    ),
)


def _question(intro: str, text: str, what: str, sc_parts: tuple, pq_title: str) -> str:
    def listed(parts: tuple) -> list[str]:
        return [f"- {name}: {meaning}" for name, meaning in parts]

    def names(parts: tuple) -> str:
        return ", ".join(f"<{name}>" for name, _ in parts)

    answer_form = (
        f'{{"reason": "<one or two sentences>", "semantic_consistency": [{names(sc_parts)}], '
        f'"perceptual_quality": [{names(PQ_ASKED)}]}}'
    )
    return "\n".join(
        [
            intro,
            "",
            f'"{text}"',
            "",
            f"Rate the {what} with {len(sc_parts) + len(PQ_ASKED)} whole numbers, each from 0 (worst) to 10 (best).",
            f"Semantic consistency, {len(sc_parts)} sub-scores:",
            *listed(sc_parts),
            f"{pq_title}, {len(PQ_ASKED)} sub-scores:",
            *listed(PQ_ASKED),
            "",
            "Answer with one JSON object and nothing else, in this form:",
            answer_form,
        ]
    )


# The prose reading takes at most as many numbers per group as the questions ask for.
SUBSCORES_PER_GROUP = max(len(parts) for parts in (T2I_SC_ASKED, EDIT_SC_ASKED, PQ_ASKED))
MIN_SCORE, MAX_SCORE = 0.0, 10.0
# Keys of the JSON answer, compared after `_normal_key`.
SC_KEYS = ("semantic_consistency", "sc", "semantic")
PQ_KEYS = ("perceptual_quality", "pq", "perceptual", "quality")
SC_PARTS = tuple(name for name, _ in T2I_SC_ASKED + EDIT_SC_ASKED)
PQ_PARTS = tuple(name for name, _ in PQ_ASKED)
# Labels of the prose reading.
TEXT_LABELS = {
    "sc": re.compile(r"semantic[\s_-]*consistency|\bsc\b", re.IGNORECASE),
    "pq": re.compile(r"perceptual[\s_-]*quality|\bpq\b", re.IGNORECASE),
}
# A number, with "/10" or "out of 10" after it swallowed; not the tail of a word, a date or a decimal.
NUMBER = re.compile(r"(?<![\w.-])(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*10(?:\.0+)?)?(?![\w.]*\d)", re.IGNORECASE)
LIST_MARKER = re.compile(r"^[ \t]*\d+[.)](?=\s)", re.MULTILINE)  # "1. elements: 7": the 1 is not a score
BLANK_LINE = re.compile(r"\n[ \t]*\n")
OPEN_BRACKET = re.compile(r"""[\s"':=]*\[""")


def judge_question(sample: Sample) -> str:
    """What the judge is asked about a sample (with the output image, and the source image first for an edit)."""
    if sample.is_edit:
        return _question(EDIT_INTRO, sample.text, "edit", EDIT_SC_ASKED, "Perceptual quality of the second image")
    return _question(T2I_INTRO, sample.text, "image", T2I_SC_ASKED, "Perceptual quality")


@dataclass(frozen=True)
class Scores:
    sc: float
    pq: float

    @property
    def overall(self) -> float:
        return math.sqrt(self.sc * self.pq)


def parse_scores(answer: str) -> Scores | None:
    """SC and PQ from a judge's answer, each the minimum of its sub-scores; None when the answer cannot be read.

    1. JSON: the first JSON value in the answer (text or code fences around it are ignored) that gives both
       groups. An object names them `semantic_consistency`/`sc` and `perceptual_quality`/`pq` (any case, spaces
       or underscores), each a number, a numeric string ("7/10"), a list of those or an object of named
       sub-scores; without group keys, the named sub-scores themselves count (elements, composition, instruction,
       preservation; naturalness, artifacts). A list of two lists is [SC sub-scores, PQ sub-scores].
    2. Prose, when no JSON value gives both groups: the numbers after a "semantic consistency"/"SC" label and
       after a "perceptual quality"/"PQ" label, up to the next label or a blank line: those inside a bracket that
       opens right after the label (an unclosed one, as in a cut-off answer, gives nothing), else the first
       `SUBSCORES_PER_GROUP`. The last label of a group with numbers counts, since the question asks for the
       reason first. "7/10" and "7 out of 10" are 7; "1." opening a line is a list marker, not a score.
    A sub-score outside [0, 10] makes the whole answer unreadable: the caller retries it; it is never clamped.
    """
    groups = _groups_from_json(answer)
    if groups is None:
        groups = _groups_from_text(answer)
    if groups is None:
        return None
    sc, pq = groups
    if not all(MIN_SCORE <= value <= MAX_SCORE for value in (*sc, *pq)):  # NaN fails too
        return None
    return Scores(min(sc), min(pq))


def _normal_key(key: str) -> str:
    return re.sub(r"[^a-z]+", "_", key.lower()).strip("_")


def _groups_from_json(answer: str) -> tuple[list[float], list[float]] | None:
    decoder = json.JSONDecoder()
    for opening in re.finditer(r"[{\[]", answer):
        try:
            value, _ = decoder.raw_decode(answer, opening.start())
        except json.JSONDecodeError:
            continue
        groups = _groups_from_value(value)
        if groups is not None:
            return groups
    return None


def _groups_from_value(value) -> tuple[list[float], list[float]] | None:
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(group, list) for group in value):
            sc, pq = _numbers_in(value[0]), _numbers_in(value[1])
            return (sc, pq) if sc and pq else None
        return None
    if not isinstance(value, dict):
        return None
    fields = {_normal_key(str(key)): field for key, field in value.items()}
    sc_field = next((fields[key] for key in SC_KEYS if key in fields), None)
    pq_field = next((fields[key] for key in PQ_KEYS if key in fields), None)
    if sc_field is None:
        sc_field = [fields[key] for key in SC_PARTS if key in fields] or None
    if pq_field is None:
        pq_field = [fields[key] for key in PQ_PARTS if key in fields] or None
    if sc_field is None or pq_field is None:
        return None
    sc, pq = _numbers_in(sc_field), _numbers_in(pq_field)
    return (sc, pq) if sc and pq else None


def _numbers_in(value) -> list[float] | None:
    """The sub-scores a JSON value holds; None if any part of it is not a score."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, str):
        return [float(match.group(1)) for match in NUMBER.finditer(value)] or None
    if isinstance(value, dict):
        # Named sub-scores; a text without numbers next to them (a "reason") is not one.
        value = [item for item in value.values() if not (isinstance(item, str) and not NUMBER.search(item))]
    if isinstance(value, list):
        parts = [_numbers_in(item) for item in value]
        if not parts or any(part is None for part in parts):
            return None
        return [number for part in parts for number in part]
    return None


def _groups_from_text(answer: str) -> tuple[list[float], list[float]] | None:
    # List markers become spaces, so that positions stay as they were.
    text = LIST_MARKER.sub(lambda marker: " " * len(marker.group()), answer)
    labels = sorted(
        (match.start(), match.end(), group)
        for group, pattern in TEXT_LABELS.items()
        for match in pattern.finditer(text)
    )
    found = {}
    for index, (_, end, group) in enumerate(labels):
        stop = labels[index + 1][0] if index + 1 < len(labels) else len(text)
        segment = BLANK_LINE.split(text[end:stop], maxsplit=1)[0]
        bracket = OPEN_BRACKET.match(segment)
        if bracket is not None:
            close = segment.find("]", bracket.end())
            numbers = [] if close < 0 else [float(m.group(1)) for m in NUMBER.finditer(segment, bracket.end(), close)]
        else:
            numbers = [float(match.group(1)) for match in NUMBER.finditer(segment)][:SUBSCORES_PER_GROUP]
        if numbers:
            found[group] = numbers  # a later label of the group replaces an earlier one
    if "sc" not in found or "pq" not in found:
        return None
    return found["sc"], found["pq"]


# --- scoring ----------------------------------------------------------------------------------------------------------

SCORE_COLUMNS = ("task", "key", "sc", "pq", "overall", "status", "attempts", "answer")
OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class ScoreRow:
    """One line of the scores file. A failed row (no readable answer after every retry) has no scores."""

    task: str
    key: str
    sc: float | None
    pq: float | None
    status: str
    attempts: int
    answer: str  # the judge's last answer as the file keeps it: one line (`_one_line`), cut short

    @property
    def overall(self) -> float | None:
        return None if self.status != OK else math.sqrt(self.sc * self.pq)


def unscored(samples: Sequence[Sample], fullset: Path, scores_file: Path, retry_failed: bool = False) -> list[Sample]:
    """The samples with an output file but no row in `scores_file` (nor a failed row, with `retry_failed`)."""
    rows = read_scores(scores_file) if scores_file.is_file() else {}
    done = {key for key, row in rows.items() if row.status == OK or not retry_failed}
    return [
        sample for sample in samples if (sample.task, sample.key) not in done and output_path(fullset, sample).is_file()
    ]


def score(
    judge: VLMJudge,
    samples: Sequence[Sample],
    fullset: Path,
    scores_file: Path,
    retries: int = 2,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Score the outputs not in `scores_file` yet, rewriting the file after each one; returns counts of what was
    scored, failed, already there (`skipped`) and without an output file (`missing`).

    An answer that `parse_scores` cannot read is asked again up to `retries` times, then recorded as failed:
    never as a zero. Failed rows are kept on a rerun unless `retry_failed`.
    """
    todo = unscored(samples, fullset, scores_file, retry_failed)
    rows = read_scores(scores_file) if scores_file.is_file() else {}
    missing = sum(not output_path(fullset, sample).is_file() for sample in samples)
    counts = dict(scored=0, failed=0, skipped=len(samples) - len(todo) - missing, missing=missing)
    for sample in tqdm(todo, desc="judging", unit="output", disable=not progress):
        row = judge_sample(judge, sample, fullset, retries)
        rows[(sample.task, sample.key)] = row
        write_scores(scores_file, rows.values())
        counts["scored" if row.status == OK else "failed"] += 1
    return counts


def judge_sample(judge: VLMJudge, sample: Sample, fullset: Path, retries: int) -> ScoreRow:
    """Ask the judge about one output (after its source, for an edit) until an answer can be read."""
    output = load_rgb(output_path(fullset, sample))
    images = [output]
    if sample.is_edit:
        # The source as the model saw it, so that the judge does not count the crop as an unrequested change.
        source = resize_and_center_crop(load_rgb(sample.source, sample.where), output.height, output.width)
        images = [source, output]
    question = judge_question(sample)
    for attempt in range(retries + 1):
        answer = judge.ask(images, question, seed=None if attempt == 0 else sample_seed(sample) + attempt)
        scores = parse_scores(answer)
        if scores is not None:
            return ScoreRow(sample.task, sample.key, scores.sc, scores.pq, OK, attempt + 1, _one_line(answer))
    return ScoreRow(sample.task, sample.key, None, None, FAILED, retries + 1, _one_line(answer))


def _one_line(text: str, limit: int = ANSWER_CHARS) -> str:
    """`text` with line breaks and other unprintable characters as Python escapes (\\n, \\x14), cut to `limit`
    characters: every row of the scores file stays one line."""
    escaped = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text.replace("\\", "\\\\")
    )
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def _number(value: float | None) -> str:
    return "" if value is None else format(value, ".6g")


def write_scores(path: Path, rows: Iterable[ScoreRow]) -> None:
    """The whole file, through a temporary name: a killed run leaves the previous file whole."""

    def order(row: ScoreRow) -> tuple:
        return TASKS.index(row.task), (0, int(row.key), "") if row.key.isdigit() else (1, 0, row.key)

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, lineterminator="\n")
            writer.writerow(SCORE_COLUMNS)
            for row in sorted(rows, key=order):
                values = (row.sc, row.pq, row.overall)
                writer.writerow([row.task, row.key, *map(_number, values), row.status, row.attempts, row.answer])

    _write_atomically(path, write)


def read_scores(path: Path) -> dict[tuple[str, str], ScoreRow]:
    """The rows of a scores file by (task, key); a bad row is a BenchError naming `FILE:LINE`."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = [column for column in SCORE_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise BenchError(f"{path}:1: not a scores file: no column(s) {', '.join(missing)}")
        for record in reader:
            try:
                row = _score_row(record)
            except ValueError as error:
                raise BenchError(f"{path}:{reader.line_num}: {error}") from None
            rows[(row.task, row.key)] = row
    return rows


def _score_row(record: dict) -> ScoreRow:
    task, status = record["task"], record["status"]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if status not in (OK, FAILED):
        raise ValueError(f"status must be {OK} or {FAILED}, got {status!r}")
    sc = pq = None
    if status == OK:
        sc, pq = float(record["sc"]), float(record["pq"])  # a ValueError names the bad text
        if not (MIN_SCORE <= sc <= MAX_SCORE and MIN_SCORE <= pq <= MAX_SCORE):
            raise ValueError(f"scores must lie in [{MIN_SCORE:g}, {MAX_SCORE:g}], got sc {sc:g}, pq {pq:g}")
    attempts = int(record["attempts"]) if record["attempts"] else 0
    return ScoreRow(task, record["key"], sc, pq, status, attempts, record["answer"] or "")


# --- the report -------------------------------------------------------------------------------------------------------

AVERAGE = "average"


@dataclass(frozen=True)
class TaskSummary:
    """Means over a task's scored samples (None when there are none), and how many were scored and failed."""

    sc: float | None
    pq: float | None
    overall: float | None
    scored: int
    failed: int


def summarize(rows: Iterable[ScoreRow]) -> dict[str, TaskSummary]:
    """Per task: the means of SC, PQ and overall = sqrt(SC * PQ) over its scored samples (failures are left out
    and counted). Then `average`: the mean of the four tasks' means, defined only when every task has one."""
    rows = list(rows)
    summary = {}
    for task in TASKS:
        scored = [row for row in rows if row.task == task and row.status == OK]
        failed = sum(row.task == task and row.status == FAILED for row in rows)
        means = [_mean([getattr(row, name) for row in scored]) for name in ("sc", "pq", "overall")]
        summary[task] = TaskSummary(*means, scored=len(scored), failed=failed)
    tasks = [summary[task] for task in TASKS]
    means = [_mean([getattr(task, name) for task in tasks]) for name in ("sc", "pq", "overall")]
    summary[AVERAGE] = TaskSummary(
        *means, scored=sum(task.scored for task in tasks), failed=sum(task.failed for task in tasks)
    )
    return summary


def _mean(values: list[float | None]) -> float | None:
    if not values or any(value is None for value in values):
        return None
    return sum(values) / len(values)


def format_report(summary: Mapping[str, TaskSummary], method: str = "") -> str:
    """A markdown table: a row per task and the average over the four, means to two decimals."""

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    title = f"SemGen-Bench: {method}" if method else "SemGen-Bench"
    lines = [
        f"### {title}",
        "",
        "| task | SC | PQ | overall | scored | failed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, task in summary.items():
        label = f"**{name}**" if name == AVERAGE else name
        values = " | ".join(cell(value) for value in (task.sc, task.pq, task.overall))
        lines.append(f"| {label} | {values} | {task.scored} | {task.failed} |")
    lines.append("")
    lines.append(
        "overall = sqrt(SC * PQ) per sample; means per task over scored samples, failed answers left out; "
        "the average is the mean of the four tasks."
    )
    return "\n".join(lines)
