"""Time and memory of indexing a large JSONL file, and of loading its cached index.

Writes a JSONL file of `--lines` records (half text-to-image, half edits, ~250 bytes each) in a temporary
folder, with a few hundred small PNG files they point at, then indexes it in a fresh subprocess (no cache yet)
so that the peak RSS the kernel reports for that process and its pool workers belongs to the indexing alone.
Then it loads the cached index and times that.

    python scripts/benchmark_index.py --lines 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from unialignment.data.jsonl_index import JsonlIndex

WORDS = "a the red blue small large cat dog house river mountain sky under over near bright dark old new".split()


def write_dataset(folder: Path, num_lines: int, num_images: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (folder / "img").mkdir()
    images = [f"img/{i:05d}.png" for i in range(num_images)]
    for i, image in enumerate(images):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(folder / image)
    path = folder / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_lines):
            caption = " ".join(rng.choices(WORDS, k=14))
            if i % 2 == 0:
                record = {
                    "dataset": "bench",
                    "image": [rng.choice(images)],
                    "conversations": [{"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}],
                    "img_w": [1024],
                    "img_h": [768],
                }
            else:
                record = {
                    "image": [rng.choice(images), rng.choice(images)],
                    "conversations": [{"from": "human", "value": caption}, {"from": "gpt", "value": ""}],
                    "instruction": " ".join(rng.choices(WORDS, k=6)),
                }
            f.write(json.dumps(record) + "\n")
    return path


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        kilobytes = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kilobytes / 1024


def measure_build(path: str, num_workers: int | None):
    """Runs in the fresh subprocess: build the index and print its numbers as JSON."""
    baseline_mb = current_rss_mb()
    start = time.perf_counter()
    index = JsonlIndex.build_or_load(path, task=None, num_workers=num_workers, progress=False)
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux; for children it is the largest peak among the waited-for pool workers.
    main_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    numbers = {"valid": len(index), "skipped": index.num_skipped, "seconds": seconds, "baseline_mb": baseline_mb}
    print(json.dumps(numbers | {"main_peak_mb": main_peak_mb, "worker_peak_mb": worker_peak_mb}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--num-workers", type=int, default=None, help="default: JsonlIndex's choice")
    parser.add_argument("--measure-build", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_build:
        measure_build(args.measure_build, args.num_workers)
        return

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = write_dataset(Path(folder), args.lines, args.images)
        size_mb = path.stat().st_size / 2**20
        print(f"wrote {args.lines:,} lines ({size_mb:.0f} MiB) in {time.perf_counter() - start:.1f} s")

        command = [sys.executable, __file__, "--measure-build", str(path)]
        if args.num_workers is not None:
            command += ["--num-workers", str(args.num_workers)]
        build = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)

        load_seconds = []
        for _ in range(5):
            start = time.perf_counter()
            index = JsonlIndex.build_or_load(path, task=None, progress=False)
            load_seconds.append(time.perf_counter() - start)
        assert len(index) == build["valid"], "the cached index differs from the built one"

    lines = build["valid"] + build["skipped"]
    rows = [
        ("lines", f"{lines:,}"),
        ("valid / skipped", f"{build['valid']:,} / {build['skipped']:,}"),
        ("build seconds", f"{build['seconds']:.2f}"),
        ("lines / s", f"{lines / build['seconds']:,.0f}"),
        (
            "peak RSS MB, main process",
            f"{build['main_peak_mb']:.0f} (baseline after imports {build['baseline_mb']:.0f})",
        ),
        ("peak RSS MB, largest worker", f"{build['worker_peak_mb']:.0f}" if build["worker_peak_mb"] else "no workers"),
        ("cached load seconds (median of 5)", f"{statistics.median(load_seconds):.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("peak RSS: ru_maxrss of a fresh indexing subprocess (RUSAGE_SELF) and of its pool workers (RUSAGE_CHILDREN)")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
