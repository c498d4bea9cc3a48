"""Samples per second one DataLoader worker (one core) prepares: read, decode, resize-crop, pixels, collate.

Writes `--images` 1024 x 1024 source images (JPEG and PNG, photo-like: smooth gradients, shapes, grain) and JSONL
files of text-to-image and edit records over them in a temporary folder, then times the dataset's `__getitem__` and
the collator (T5 tokenization) in this one process, as a worker runs them, for each source format, task and way of
decoding: a full decode, or PIL's draft mode (`data.draft_decode`: a JPEG at least twice the resolution decoded at
1/2, 1/4 or 1/8 scale in the DCT domain), with float32 or uint8 pixels (`speed.uint8_pixels`).

    python scripts/benchmark_dataloader.py                       # 512 px, one core
    python scripts/benchmark_dataloader.py --resolution 1024 --samples 64

Divide a GPU's samples/s by a row's samples/s for the worker cores it needs (training goal: 4 workers per GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw

from unialignment.data.collate import Collator
from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
from unialignment.data.sampler import SampleKey
from unialignment.frozen.text_encoder import load_t5_tokenizer
from unialignment.toy.components import make_tiny_components
from unialignment.toy.t5 import caption_corpus

SOURCE_SIZE = 1024


def photo_like(seed: int, size: int = SOURCE_SIZE) -> Image.Image:
    """A size x size RGB image with what makes photos cost what they cost to code: smooth gradients, edges, grain."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xs + c) * np.cos(4 * ys - c) for c in rng.uniform(0, 3, 3)], axis=-1)
    pixels = (127 + 90 * base + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, size, 2)
        radius = int(rng.integers(size // 32, size // 6))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    return image


def write_dataset(folder: Path, num_images: int) -> dict[tuple[str, str], Path]:
    """JSONL files of t2i and edit records over JPEG and PNG copies of the same images: {(task, format): path}."""
    captions = caption_corpus()
    for number in range(num_images):
        image = photo_like(number)
        image.save(folder / f"{number}.jpg", quality=90)
        image.save(folder / f"{number}.png")
    files = {}
    for extension in ("jpg", "png"):
        for task in ("t2i", "edit"):
            lines = []
            for number in range(num_images):
                caption = captions[number % len(captions)]
                if task == "t2i":
                    turns = [{"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}]
                    record = {"image": [f"{number}.{extension}"], "conversations": turns}
                else:
                    source = f"{(number + 1) % num_images}.{extension}"
                    turns = [{"from": "human", "value": caption}, {"from": "gpt", "value": ""}]
                    record = {"image": [source, f"{number}.{extension}"], "conversations": turns, "instruction": "edit"}
                lines.append(json.dumps(record))
            path = folder / f"{task}_{extension}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            files[task, extension] = path
    return files


def samples_per_second(dataset: UniAlignmentDataset, collator: Collator, samples: int, batch: int) -> float:
    """Median over three passes of `samples` samples, prepared and collated `batch` at a time."""
    group = dataset.groups[0]
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for first in range(0, samples, batch):
            keys = [SampleKey(0, 0, index % len(group), 0, 0) for index in range(first, first + batch)]
            collator([dataset[key] for key in keys])
        rates.append(samples / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=8, help="distinct source images (default 8)")
    parser.add_argument("--samples", type=int, default=48, help="samples per timed pass (default 48)")
    parser.add_argument("--batch", type=int, default=4, help="samples per collated batch (default 4)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker, one core
    try:
        rows = measure(args)
    finally:
        torch.set_num_threads(threads)
    print(
        f"\n### DataLoader worker throughput: {args.resolution} px from {SOURCE_SIZE} x {SOURCE_SIZE} sources, one "
        f"core\n\n- {platform.processor() or platform.machine()}, Python {platform.python_version()}, Pillow "
        f"{PIL.__version__}, torch {torch.__version__}; batches of {args.batch}, T5 tokenization included\n"
    )
    print("| task | source | decode | pixels | samples/s per core |\n| --- | --- | --- | --- | ---: |")
    for row in rows:
        decode = "draft (reduced scale)" if row["draft"] else "full"
        pixels = "uint8" if row["uint8"] else "float32"
        print(f"| {row['task']} | {row['source']} | {decode} | {pixels} | {row['samples_per_s']:.1f} |")
    return rows


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        files = write_dataset(folder, args.images)
        tokenizer = load_t5_tokenizer(make_tiny_components(folder / "components").tokenizer, 256)
        collator = Collator(tokenizer, 256)
        for (task, extension), path in files.items():
            spec = [{"name": task, "datasets": [{"path": str(path), "task": task}]}]
            groups = build_task_groups(spec, args.resolution, progress=False)
            drafts = (False, True) if extension == "jpg" else (False,)
            for draft in drafts:
                for uint8 in (False, True):
                    dataset = UniAlignmentDataset(groups, uint8_pixels=uint8, draft_decode=draft)
                    rate = samples_per_second(dataset, collator, args.samples, args.batch)
                    rows.append(dict(task=task, source=extension, draft=draft, uint8=uint8, samples_per_s=rate))
                    print(f"[dataloader] {task} {extension} draft={draft} uint8={uint8}: {rate:.1f} samples/s")
    return rows


if __name__ == "__main__":
    main()
