"""A small dataset folder in the formats of docs/METHOD.md section 7, as the built-in demo reads it.

    DIR/train/<task>.jsonl      what the three stages train on
    DIR/heldout/<task>.jsonl    what the demo generates, edits, captions and answers after training

`<task>` is one of `TASK_FILES` (t2i, edit, perception, composition, vqa); any subset may be present, and
image paths resolve against the JSONL file's folder. `scripts/make_toy_world.py` writes such a folder; so can
anyone with another world (other colours, shapes, words or image sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

from unialignment.data.records import Record, RecordError, TaskKind, parse_record
from unialignment.errors import UserError

TASK_FILES = {
    "t2i": TaskKind.TEXT_TO_IMAGE,
    "edit": TaskKind.EDIT,
    "perception": TaskKind.PERCEPTION,
    "composition": TaskKind.COMPOSITION,
    "vqa": TaskKind.UNDERSTANDING,
}
SPLITS = ("train", "heldout")


class DatasetFolderError(UserError):
    """A dataset folder that does not follow the layout above; the message names the file (and line)."""


def split_files(root: str | Path, split: str) -> dict[str, Path]:
    """The task files of one split, in `TASK_FILES` order. Unknown `.jsonl` names are an error, not skipped."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetFolderError(f"{folder}: no such folder; a dataset folder holds {' and '.join(SPLITS)}/")
    unknown = sorted(p.name for p in folder.glob("*.jsonl") if p.stem not in TASK_FILES)
    if unknown:
        raise DatasetFolderError(f"{folder}: unknown task file(s) {unknown}; expected names {list(TASK_FILES)}")
    files = {task: folder / f"{task}.jsonl" for task in TASK_FILES if (folder / f"{task}.jsonl").is_file()}
    if not files:
        raise DatasetFolderError(f"{folder}: no task files; expected one or more of {list(TASK_FILES)} (.jsonl)")
    return files


def read_records(path: Path, task: str) -> list[Record]:
    """Every record of one task file; a malformed line or a missing image is an error naming FILE:LINE."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            location = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = parse_record(json.loads(line), TASK_FILES[task], path.parent, None, location)
            except json.JSONDecodeError as error:
                raise DatasetFolderError(f"{location}: not valid JSON ({error.msg})") from None
            except RecordError as error:
                raise DatasetFolderError(f"{location}: {error}") from None
            for image in (*record.source_images, record.target_image):
                if not Path(image).is_file():
                    raise DatasetFolderError(f"{location}: image not found: {image}")
            records.append(record)
    if not records:
        raise DatasetFolderError(f"{path}: no records")
    return records


def read_split(root: str | Path, split: str) -> dict[str, list[Record]]:
    return {task: read_records(path, task) for task, path in split_files(root, split).items()}


def texts_of(records: list[Record]) -> list[str]:
    """Every text a model meets in these records: prompts, instructions, captions, questions, answers."""
    texts = []
    for record in records:
        texts.extend(text for text in (record.prompt, record.caption, record.question) if text)
    return texts


def images_of(records: list[Record]) -> list[str]:
    """Every distinct image path of these records, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for image in (*record.source_images, record.target_image):
            seen.setdefault(image, None)
    return list(seen)


def write_if_changed(path: Path, content: bytes) -> None:
    """Write `content` unless `path` already holds it: unchanged files keep their mtime, so the JSONL index cached
    beside a data file stays valid across re-runs of a generator."""
    if path.is_file() and path.read_bytes() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
