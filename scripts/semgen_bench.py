"""SemGen-Bench (UniAlignment, Song et al. 2025, arXiv:2509.23760): generate, judge, report.

    python scripts/semgen_bench.py generate --model PIPELINE --bench data/semgen_bench --out results --method ours
    torchrun --nproc-per-node 8 scripts/semgen_bench.py generate --model runs/stage3 --bench ... --out ... --method s3
    python scripts/semgen_bench.py score --judge Qwen2.5-VL-72B-Instruct-AWQ --bench ... --out results --method ours
    python scripts/semgen_bench.py report --out results --method ours

`generate` writes the 600 outputs to OUT/METHOD/fullset/<task>/<key>.png at the benchmark's settings (512 px, 50
steps, guidance 7.0 for text-to-image and 9.0 for edits); files already there are skipped, so a killed run resumes,
and `--shard I --num-shards N` (or torchrun's RANK and WORLD_SIZE) splits the work into disjoint slices. `score`
asks a VLM judge about every output and writes OUT/METHOD/semgen_scores.csv, skipping rows already there. `report`
prints SC, PQ and overall = sqrt(SC * PQ) per task and their average as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from unialignment.evaluation.semgen_bench import (
    DEFAULT_JUDGE,
    EDIT_GUIDANCE,
    SCORES_FILE,
    SIZE,
    STEPS,
    T2I_GUIDANCE,
    BenchError,
    GenerationSettings,
    check_settings,
    generate,
    method_folder,
    pending,
    read_bench,
    shard,
    shard_from_environment,
)
from unialignment.evaluation.semgen_scores import format_report, read_scores, score, summarize, unscored
from unialignment.evaluation.vlm_judge import JudgeError, VLMJudge


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--out", type=Path, required=True, help="results folder; outputs go to OUT/METHOD/")
    where.add_argument("--method", required=True, help="a name for the model under test (a folder name)")
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--bench", type=Path, required=True, help="folder with semgen_bench.jsonl and images/")

    make = commands.add_parser("generate", parents=[where, bench], help="make the benchmark's outputs")
    make.add_argument("--model", type=Path, required=True, help="a pipeline folder or a training run folder")
    make.add_argument("--batch-size", type=_positive, default=4, help="outputs per pipeline call (default 4)")
    make.add_argument("--shard", type=_count, help="this process's slice (default: RANK, else 0)")
    make.add_argument("--num-shards", type=_positive, help="number of slices (default: WORLD_SIZE, else 1)")
    make.add_argument("--size", type=_positive, default=SIZE, help=f"output side in pixels (default {SIZE})")
    make.add_argument("--steps", type=_positive, default=STEPS, help=f"sampling steps (default {STEPS})")
    make.add_argument(
        "--guidance", type=float, help=f"one guidance scale for every task (default {T2I_GUIDANCE} / {EDIT_GUIDANCE})"
    )
    make.add_argument("--seed", type=int, default=0, help="added to every sample's own seed (default 0)")
    make.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    make.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda")

    judge = commands.add_parser("score", parents=[where, bench], help="score the outputs with a VLM judge")
    judge.add_argument("--judge", type=Path, default=Path(DEFAULT_JUDGE), help=f"a chat VLM folder ({DEFAULT_JUDGE})")
    judge.add_argument("--retries", type=_count, default=2, help="asks again after an unreadable answer (default 2)")
    judge.add_argument("--retry-failed", action="store_true", help="score again the rows recorded as failed")
    judge.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length limit (default 256)")
    judge.add_argument("--device", help="default: spread over the visible GPUs, else cpu")
    judge.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    judge.add_argument("--scores", type=Path, help=f"the scores file (default OUT/METHOD/{SCORES_FILE})")

    report = commands.add_parser("report", help="print the per-task table")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", type=Path, help="a scores file")
    source.add_argument("--out", type=Path, help=f"with --method: reads OUT/METHOD/{SCORES_FILE}")
    report.add_argument("--method", help="the method name, with --out")
    return parser


def run_generate(args: argparse.Namespace) -> int:
    index, count = shard_from_environment()
    index = index if args.shard is None else args.shard
    count = count if args.num_shards is None else args.num_shards
    settings = GenerationSettings(
        size=args.size,
        steps=args.steps,
        t2i_guidance=T2I_GUIDANCE if args.guidance is None else args.guidance,
        edit_guidance=EDIT_GUIDANCE if args.guidance is None else args.guidance,
        seed=args.seed,
    )
    method_dir = method_folder(args.out, args.method)
    fullset = method_dir / "fullset"
    samples = shard(read_bench(args.bench), index, count)  # every line checked before the long load
    check_settings(method_dir, settings)
    todo = pending(samples, fullset)
    print(f"shard {index}/{count}: {len(samples)} output(s), {len(samples) - len(todo)} already done", file=sys.stderr)
    if todo:
        device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
        # Imported here, so that the report and every argument check run without loading diffusers.
        from unialignment.frozen.components import DTYPES
        from unialignment.training.run_folder import load_pipeline

        try:
            pipe = load_pipeline(args.model, device, DTYPES.get(args.dtype))
        except (OSError, ValueError) as error:  # a wrong folder or run; ConfigError and ExportError are ValueErrors
            raise BenchError(f"cannot load {args.model}: {error}") from None
        if args.size % pipe.size_multiple:
            raise BenchError(f"--size {args.size} is not a multiple of {pipe.size_multiple}, as this model needs")
        pipe.set_progress_bar_config(disable=True)  # one bar over batches, not one per call
        # Under a launcher only the first shard draws a progress bar; every shard reports its count.
        progress = "WORLD_SIZE" not in os.environ or index == 0
        written = generate(pipe, todo, fullset, settings, batch_size=args.batch_size, progress=progress)
        print(f"shard {index}/{count}: wrote {written} output(s) to {fullset}", file=sys.stderr)
    return 0


def run_score(args: argparse.Namespace) -> int:
    method_dir = method_folder(args.out, args.method)
    samples = read_bench(args.bench)
    scores_file = args.scores or method_dir / SCORES_FILE
    if not unscored(samples, method_dir / "fullset", scores_file, args.retry_failed):
        print(f"nothing to score: every output in {method_dir / 'fullset'} has a row in {scores_file}", file=sys.stderr)
        return 0
    try:
        judge = VLMJudge.from_pretrained(
            args.judge, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens
        )
    except OSError as error:
        raise JudgeError(f"cannot load the judge {args.judge}: {error}") from None
    counts = score(judge, samples, method_dir / "fullset", scores_file, args.retries, args.retry_failed)
    print(
        f"scored {counts['scored']}, failed {counts['failed']}, already scored {counts['skipped']}, "
        f"without an output {counts['missing']}; scores in {scores_file}",
        file=sys.stderr,
    )
    return 0


def run_report(args: argparse.Namespace) -> int:
    if args.scores is None and args.method is None:
        raise BenchError("report --out needs --method (or give --scores FILE)")
    scores_file = args.scores or method_folder(args.out, args.method) / SCORES_FILE
    if not scores_file.is_file():
        raise BenchError(f"no scores file {scores_file}; run `score` first")
    print(format_report(summarize(read_scores(scores_file).values()), args.method or scores_file.stem))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"generate": run_generate, "score": run_score, "report": run_report}[args.command]
    try:
        return run(args)
    except (BenchError, JudgeError) as error:  # a user mistake or a bad file: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
