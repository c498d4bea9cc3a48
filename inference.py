"""Command line over `UniAlignmentPipeline`: generation, editing, perception, composition, captioning and VQA.

    python inference.py t2i --model PIPELINE --prompt "a red fox in the snow" --output fox.png
    python inference.py edit --model PIPELINE --image cat.png --instruction "Make the cat black." --output edited/
    python inference.py perception --model PIPELINE --image room.png --task depth --output depth.png
    python inference.py compose --model PIPELINE --images a.png b.png --instruction "..." --output composed.png
    python inference.py caption --model runs/stage3 --image cat.png                 # a run folder: its export/ema
    python inference.py vqa --model PIPELINE --image cat.png --question "What colour is the cat?" --output a.jsonl
    python inference.py --model PIPELINE --jobs jobs.jsonl --steps 50                  # many jobs, one load
    python inference.py --model PIPELINE --jobs jobs.jsonl --batch-size 16             # ... 16 per pipeline call

`--model` is a pipeline folder (ours or the authors' layout) or a training run folder, whose newest EMA export is
assembled with the run's frozen components in memory. Images go to `--output`: a file (.png, .jpg, ...) for one
image, otherwise a folder of numbered PNGs. Texts go to a .txt or .jsonl file, or to stdout.

Each line of a jobs file is an object with `task` and that task's options, named as on the command line
(`{"task": "edit", "image": "cat.png", "instruction": "...", "output": "out/cat.png", "seed": 1}`; perception's
`--task` is `map` there). Relative paths resolve against the jobs file's folder; options given on the command line
(`--steps`, `--size`, ...) are defaults for every job. A bad line is reported as `FILE:LINE` and the others still
run; the exit status is 1 if any job failed. With `--batch-size N`, consecutive caption, VQA, edit, perception or
composition jobs with the same settings share one pipeline call, N at a time; each keeps its own seed, so it gets
the output it would get alone. The option parsers, the job runner and the output naming live in
`unialignment/pipelines/jobs.py`; this file is the command line over them.
"""

from __future__ import annotations

import sys

from unialignment.pipelines.jobs import (
    DEFAULTS,
    IMAGE_TASKS,
    TEXT_TASKS,
    Call,
    UsageError,
    build_parser,
    prepare,
    read_jobs,
    run_jobs,
)

__all__ = ["Call", "main", "run_jobs"]  # what tests and notebooks take from this script


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    args = {**DEFAULTS, **vars(parser.parse_args(argv))}
    if args["jobs"] is not None and args["command"] is not None:
        parser.error("give a task or --jobs FILE, not both")
    if args["jobs"] is None and args["command"] is None:
        parser.error(f"give a task ({', '.join(IMAGE_TASKS + TEXT_TASKS)}) or --jobs FILE")
    if args["model"] is None:
        parser.error("--model is required")
    # Imported here, after the arguments are checked, so that a mistake is reported at once rather than after
    # diffusers and transformers have loaded.
    from unialignment.files import model_folder
    from unialignment.frozen.components import DTYPES
    from unialignment.training.run_folder import load_pipeline, size_multiple_of

    try:
        args["model"] = model_folder(args["model"], "--model")  # a hub repo id: its snapshot in the local cache
        size_multiple = size_multiple_of(args["model"])  # from the configs: no weights loaded yet
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot read {args['model']}: {error}", file=sys.stderr)
        return 2
    if args["jobs"] is None:
        try:  # checked, images loaded, before the model: a mistake costs no loading time
            jobs = [("", prepare(args, size_multiple))]
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    else:
        defaults = {key: value for key, value in args.items() if key not in ("command", "jobs")}
        try:
            jobs = read_jobs(args["jobs"], defaults)
        except UsageError as error:
            parser.error(str(error))
        if not jobs:
            parser.error(f"{args['jobs']} holds no jobs")
        for where, job in jobs:  # bad lines are reported before the long load
            if isinstance(job, UsageError):
                print(f"{where}: error: {job}", file=sys.stderr)

    good = [(where, job) for where, job in jobs if not isinstance(job, UsageError)]
    failed = len(jobs) - len(good)
    if good:
        try:
            pipe = load_pipeline(args["model"], args["device"], DTYPES.get(args["dtype"]), args["cpu_offload"])
            if args["lora"] is not None:
                pipe.load_lora_weights(args["lora"])
            if args["compile"] or args["cuda_graphs"]:
                pipe.enable_fast_sampling(cuda_graphs=args["cuda_graphs"])
        except (OSError, ValueError) as error:  # a wrong folder or run; ConfigError and ExportError are ValueErrors
            print(f"error: cannot load {args['model']}: {error}", file=sys.stderr)
            return 2
        failed += run_jobs(pipe, good, args["batch_size"])
    if args["jobs"] is None:
        return 2 if failed else 0
    if failed:
        print(f"{failed} of {len(jobs)} job(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
