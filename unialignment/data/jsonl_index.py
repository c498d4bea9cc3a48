"""A validated index of a JSONL training file: numpy arrays of byte offsets, read one record at a time.

Millions of lines must neither become millions of Python objects nor be re-validated every run. The index is
built once per file (in parallel over byte ranges), keeps only numpy arrays plus the short list of skipped
lines, and is cached beside the data as `.<filename>.index.npz`, keyed by the file's size and mtime and by the
validation settings. Records are parsed on demand from their byte offset, so the object is cheap to pickle
into DataLoader workers.
"""

from __future__ import annotations

import array
import contextlib
import functools
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from unialignment.data.records import Record, RecordError, TaskKind, parse_record
from unialignment.errors import UserError
from unialignment.files import atomic_path

# Bump when the arrays or the validation rules change, so that old caches are rebuilt.
INDEX_FORMAT_VERSION = 2  # 2: texts that are not valid UTF-8 are skipped
EMPTY_LINE = "empty line"
# Chunks are at most this big so that progress moves and workers stay balanced.
MAX_CHUNK_BYTES = 32 * 2**20
# Below this size a pool costs more than it saves.
MIN_BYTES_FOR_WORKERS = 16 * 2**20
MAX_WORKERS = 16
# Images are shared between many records; remembering this many existence checks avoids most stat calls.
EXISTS_CACHE_SIZE = 2**16
SKIP_LINES_IN_ERRORS = 5


@dataclass(frozen=True)
class _ValidationSettings:
    task: TaskKind | None
    image_root: str | None
    check_images: bool


@dataclass
class _ChunkIndex:
    """What one byte range of the file contributes; line numbers count from 1 within the range."""

    offsets: np.ndarray
    line_numbers: np.ndarray
    tasks: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    skipped: list[tuple[int, str]]
    num_lines: int
    num_bytes: int


class JsonlIndex:
    """The valid lines of one JSONL file, as arrays, and the reasons the other lines were skipped.

    offsets: int64 byte offset of each valid line. line_numbers: int32, 1-based. tasks: uint8 `TaskKind`.
    widths / heights: int32 size of the target image from `img_w` / `img_h`, -1 when the record has none.
    skipped: (line_number, reason) of each invalid line, empty lines included.
    """

    def __init__(
        self,
        path: str | Path,
        settings: _ValidationSettings,
        file_size: int,
        file_mtime_ns: int,
        offsets: np.ndarray,
        line_numbers: np.ndarray,
        tasks: np.ndarray,
        widths: np.ndarray,
        heights: np.ndarray,
        skipped: list[tuple[int, str]],
    ):
        self.path = Path(path)
        self.settings = settings
        self.file_size = file_size
        self.file_mtime_ns = file_mtime_ns
        self.offsets = offsets
        self.line_numbers = line_numbers
        self.tasks = tasks
        self.widths = widths
        self.heights = heights
        self.skipped = skipped
        self._base_dir = self.path.absolute().parent
        self._image_root = None if settings.image_root is None else Path(settings.image_root)
        self._file = None
        self._file_pid = None

    @classmethod
    def build_or_load(
        cls,
        path: str | Path,
        task: TaskKind | None,
        image_root: str | Path | None = None,
        check_images: bool = True,
        cache_dir: str | Path | None = None,
        num_workers: int | None = None,
        progress: bool = True,
    ) -> JsonlIndex:
        """The cached index of `path` if it matches the file and the settings, else a fresh one (then cached).

        task: every line must fit this task; None infers it per line. image_root: where relative image paths
        resolve (default: the JSONL file's folder). check_images: skip lines whose image files do not exist.
        num_workers: processes for the build (default: the CPU count for files over 16 MiB, else 1).
        """
        path = Path(path)
        settings = _ValidationSettings(
            task=task,
            image_root=None if image_root is None else os.path.abspath(image_root),
            check_images=check_images,
        )
        stat = path.stat()
        cache_path = _cache_path(path, cache_dir)
        cache_key = _cache_key(stat, settings)
        cached = _load_cached(path, cache_path, cache_key, settings)
        if cached is not None:
            return cached
        index = cls._build(path, settings, stat, num_workers, progress)
        index._save(cache_path, cache_key)
        return index

    @classmethod
    def _build(cls, path: Path, settings: _ValidationSettings, stat: os.stat_result, num_workers, progress):
        if num_workers is None:
            num_workers = min(os.cpu_count() or 1, MAX_WORKERS) if stat.st_size >= MIN_BYTES_FOR_WORKERS else 1
        num_chunks = max(math.ceil(stat.st_size / MAX_CHUNK_BYTES), 4 * num_workers if num_workers > 1 else 1)
        boundaries = _line_aligned_boundaries(path, stat.st_size, num_chunks)
        jobs = [(str(path), start, end, settings) for start, end in itertools.pairwise(boundaries)]
        num_workers = min(num_workers, len(jobs))

        chunks = []
        desc = f"indexing {path.name}"
        with (
            tqdm(total=stat.st_size, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar,
            multiprocessing.Pool(num_workers) if num_workers > 1 else contextlib.nullcontext() as pool,
        ):
            for chunk in pool.imap(_index_chunk_job, jobs) if pool is not None else map(_index_chunk_job, jobs):
                chunks.append(chunk)
                bar.update(chunk.num_bytes)

        # Line numbers restart at 1 in every chunk; shift them by the lines of the chunks before.
        lines_before = 0
        for chunk in chunks:
            chunk.line_numbers += np.int32(lines_before)
            chunk.skipped = [(line + lines_before, reason) for line, reason in chunk.skipped]
            lines_before += chunk.num_lines

        def joined(name, dtype):
            return np.concatenate([np.zeros(0, dtype)] + [getattr(chunk, name) for chunk in chunks])

        return cls(
            path,
            settings,
            stat.st_size,
            stat.st_mtime_ns,
            offsets=joined("offsets", np.int64),
            line_numbers=joined("line_numbers", np.int32),
            tasks=joined("tasks", np.uint8),
            widths=joined("widths", np.int32),
            heights=joined("heights", np.int32),
            skipped=[entry for chunk in chunks for entry in chunk.skipped],
        )

    def _save(self, cache_path: Path, cache_key: dict):
        """Write atomically, so that ranks building the same index at once never read a half-written file."""
        with atomic_path(cache_path) as temporary, open(temporary, "wb") as f:
            np.savez(
                f,
                key=_json_bytes(cache_key),
                skipped=_json_bytes(self.skipped),
                offsets=self.offsets,
                line_numbers=self.line_numbers,
                tasks=self.tasks,
                widths=self.widths,
                heights=self.heights,
            )

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_bad(self) -> int:
        """Skipped lines other than empty ones: blank lines are formatting, not bad data."""
        return sum(reason != EMPTY_LINE for _, reason in self.skipped)

    def location(self, i: int) -> str:
        return f"{self.path}:{self.line_numbers[i]}"

    def skip_report(self) -> list[str]:
        return [f"{self.path}:{line}: {reason}" for line, reason in self.skipped]

    def read_record(self, i: int) -> Record:
        handle = self._handle()
        handle.seek(int(self.offsets[i]))
        try:
            obj = _decode_line(handle.readline())
            return parse_record(obj, TaskKind(self.tasks[i]), self._base_dir, self._image_root, self.location(i))
        except RecordError as error:
            raise RecordError(f"{self.location(i)}: {error} (the line was valid when indexed)") from None

    def _handle(self):
        """One handle per process: a handle inherited through fork would share its file position with the parent."""
        if self._file is None or self._file_pid != os.getpid():
            handle = open(self.path, "rb")  # lives as long as the index; closed in __del__
            stat = os.fstat(handle.fileno())
            if (stat.st_size, stat.st_mtime_ns) != (self.file_size, self.file_mtime_ns):
                handle.close()
                raise RuntimeError(f"{self.path} changed after it was indexed; build the index again")
            self._file, self._file_pid = handle, os.getpid()
        return self._file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = state["_file_pid"] = None
        return state

    def __del__(self):
        if getattr(self, "_file", None) is not None and self._file_pid == os.getpid():
            self._file.close()


def check_bad_fraction(indexes: list[JsonlIndex], max_bad_fraction: float):
    """Raise when more than `max_bad_fraction` of any file's non-empty lines were skipped, naming every such file."""
    too_bad = [index for index in indexes if index.num_bad > max_bad_fraction * (len(index) + index.num_bad)]
    if not too_bad:
        return
    lines = [f"more than {max_bad_fraction:.2%} of the lines are bad in {len(too_bad)} file(s):"]
    for index in too_bad:
        lines.append(f"  {index.path}: {index.num_bad} bad of {len(index) + index.num_bad} lines; the first ones:")
        bad = (f"{index.path}:{line}: {reason}" for line, reason in index.skipped if reason != EMPTY_LINE)
        lines += [f"    {line}" for line in itertools.islice(bad, SKIP_LINES_IN_ERRORS)]
    raise UserError("\n".join(lines))


def write_skip_report(indexes: list[JsonlIndex], path: str | Path):
    """Every skipped line of every file, one "file:line: reason" per line."""
    with open(path, "w", encoding="utf-8") as f:
        for index in indexes:
            f.writelines(line + "\n" for line in index.skip_report())


def _cache_path(path: Path, cache_dir: str | Path | None) -> Path:
    if cache_dir is None and os.access(path.parent, os.W_OK):
        return path.parent / f".{path.name}.index.npz"
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unialignment" / "jsonl_index"
    # Many datasets name their file train.jsonl; the hash of the full path keeps their caches apart.
    path_hash = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{path.name}.{path_hash}.index.npz"


def _cache_key(stat: os.stat_result, settings: _ValidationSettings) -> dict:
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "file_size": stat.st_size,
        "file_mtime_ns": stat.st_mtime_ns,
        "task": None if settings.task is None else settings.task.name,
        "image_root": settings.image_root,
        "check_images": settings.check_images,
    }


def _load_cached(path: Path, cache_path: Path, cache_key: dict, settings: _ValidationSettings) -> JsonlIndex | None:
    if not cache_path.exists():
        return None
    try:
        with np.load(cache_path) as cached:
            if json.loads(cached["key"].tobytes()) != cache_key:
                return None
            return JsonlIndex(
                path,
                settings,
                cache_key["file_size"],
                cache_key["file_mtime_ns"],
                offsets=cached["offsets"],
                line_numbers=cached["line_numbers"],
                tasks=cached["tasks"],
                widths=cached["widths"],
                heights=cached["heights"],
                skipped=[(line, reason) for line, reason in json.loads(cached["skipped"].tobytes())],
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # unreadable (e.g. truncated by a crash): rebuild


def _json_bytes(value) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def _line_aligned_boundaries(path: Path, size: int, num_chunks: int) -> list[int]:
    """Byte offsets that split the file into about `num_chunks` ranges, each starting at the start of a line."""
    boundaries = {0, size}
    with open(path, "rb") as f:
        for k in range(1, num_chunks):
            f.seek(max(size * k // num_chunks - 1, 0))
            f.readline()  # to the end of the line that holds the byte before the split point
            boundaries.add(f.tell())
    return sorted(boundaries)


def _decode_line(raw: bytes) -> dict:
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(f"invalid UTF-8: {error}") from None
    try:
        obj = json.loads(text.removeprefix("\ufeff"))  # a byte-order mark may open the file
    except json.JSONDecodeError as error:
        # a JSONL line holds no newline, so the column alone says where
        raise RecordError(f"malformed JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _target_size(obj: dict, key: str) -> int:
    """`img_w` / `img_h` of the target: a number, or a list whose last entry is the target's (sources first)."""
    size = obj.get(key)
    if isinstance(size, list):
        size = size[-1] if size else None
    if isinstance(size, (int, float)) and not isinstance(size, bool) and 0 < size < 2**31:
        return int(size)
    return -1


def _index_chunk_job(job: tuple[str, int, int, _ValidationSettings]) -> _ChunkIndex:
    path, start, end, settings = job
    base_dir = Path(os.path.abspath(path)).parent
    image_root = None if settings.image_root is None else Path(settings.image_root)
    exists = functools.lru_cache(maxsize=EXISTS_CACHE_SIZE)(os.path.exists)
    offsets, line_numbers, tasks = array.array("q"), array.array("i"), array.array("B")
    widths, heights = array.array("i"), array.array("i")
    skipped = []
    line_number, offset = 0, start
    with open(path, "rb") as f:
        f.seek(start)
        for raw in f:
            if offset >= end:
                break
            line_number += 1
            line_offset, offset = offset, offset + len(raw)
            if not raw.strip():
                skipped.append((line_number, EMPTY_LINE))
                continue
            try:
                obj = _decode_line(raw)
                record = parse_record(obj, settings.task, base_dir, image_root, location="")
                if settings.check_images:
                    for image in (record.target_image, *record.source_images):
                        if not exists(image):
                            raise RecordError(f"image file not found: {image}")
            except RecordError as error:
                skipped.append((line_number, str(error)))
                continue
            offsets.append(line_offset)
            line_numbers.append(line_number)
            tasks.append(record.task)
            widths.append(_target_size(obj, "img_w"))
            heights.append(_target_size(obj, "img_h"))
    return _ChunkIndex(
        offsets=np.frombuffer(offsets, dtype=np.int64),
        line_numbers=np.frombuffer(line_numbers, dtype=np.int32),
        tasks=np.frombuffer(tasks, dtype=np.uint8),
        widths=np.frombuffer(widths, dtype=np.int32),
        heights=np.frombuffer(heights, dtype=np.int32),
        skipped=skipped,
        num_lines=line_number,
        num_bytes=end - start,
    )
