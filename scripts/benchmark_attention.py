"""Time joint attention with narrow heads on CPU: PyTorch's kernel as is against zero-padded heads.

Prints one table: milliseconds per forward + backward of scaled-dot-product attention over 16 sequences, at the
toy model's width 128 as 8 heads of 16 and as 16 heads of 8, for the sequence lengths of its tasks (64 target
image tokens, 64 more per condition image, 4 null-image or 16 text tokens), and the padded path's speed-up: above
1x, `speed.pad_narrow_heads=True` pays on this machine.

    python scripts/benchmark_attention.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from unialignment.benchmark.workload import timed
from unialignment.models.attention import attend


def _milliseconds(fn, shape: tuple[int, ...], repeats: int) -> float:
    """Mean milliseconds of one forward + backward of `fn` over random queries, keys and values of `shape`."""
    query, key, value = (torch.randn(shape, requires_grad=True) for _ in range(3))
    seconds = timed(lambda: fn(query, key, value).sum().backward(), 2, repeats, torch.device("cpu"))
    return sum(seconds) / len(seconds) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[84, 148, 212], help="joint sequence lengths")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU threads: {torch.get_num_threads()}, batch {args.batch}, ms per forward + backward")
    print("| tokens | 8 x 16 | 16 x 8 as is | 16 x 8 padded to 16 | padded speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        wide = _milliseconds(F.scaled_dot_product_attention, (args.batch, 8, length, 16), args.repeats)
        narrow = _milliseconds(F.scaled_dot_product_attention, (args.batch, 16, length, 8), args.repeats)
        padded = _milliseconds(attend, (args.batch, 16, length, 8), args.repeats)
        print(f"| {length} | {wide:.1f} | {narrow:.1f} | {padded:.1f} | {narrow / padded:.2f}x |")


if __name__ == "__main__":
    main()
