"""SemGen-Bench's scores: each output judged (`semgen_judge.py`) into one row of the scores file, read back on
resume, and the per-task report: SC, PQ and overall = sqrt(SC * PQ), averaged per task, then over the four tasks
(docs/METHOD.md section 8)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from unialignment.data.transforms import resize_and_center_crop
from unialignment.evaluation.semgen_bench import (
    ANSWER_CHARS,
    TASKS,
    BenchError,
    Sample,
    load_rgb,
    output_path,
    sample_seed,
    write_atomically,
)
from unialignment.evaluation.semgen_judge import MAX_SCORE, MIN_SCORE, judge_question, parse_scores
from unialignment.evaluation.vlm_judge import VLMJudge

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

    write_atomically(path, write)


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
