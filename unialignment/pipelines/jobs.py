"""Tasks for `UniAlignmentPipeline` as the command line gives them: options checked, inputs loaded, outputs written,
and jobs files (many tasks, one load of the model) run in batches. `inference.py` is the command line over this.

Each line of a jobs file is an object with `task` and that task's options, named as on the command line
(`{"task": "edit", "image": "cat.png", "instruction": "...", "output": "out/cat.png", "seed": 1}`; perception's
`--task` is `map` there). Relative paths resolve against the jobs file's folder; options given on the command line
(`--steps`, `--size`, ...) are defaults for every job. An option nobody gives is not passed, so the pipeline
method's own default applies (28 steps and guidance 7.0 for text-to-image, ...): the defaults live in one place.
A bad line is reported as `FILE:LINE` and the others still run. With `batch_size` N, consecutive caption, VQA,
edit, perception or composition jobs with the same settings share one pipeline call, N at a time; each keeps its
own seed, so it gets the output it would get alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image

from unialignment.data.transforms import IMAGE_ERRORS, load_image
from unialignment.diffusion.masked_diffusion_sampler import SAMPLER_NOISES
from unialignment.errors import UserError
from unialignment.files import atomic_path, is_repo_id

IMAGE_TASKS = ("t2i", "edit", "perception", "compose")
TEXT_TASKS = ("caption", "vqa")
PERCEPTION_INSTRUCTIONS = {
    "depth": "Provide a detailed depth map of the entire scene.",  # the authors' demo instruction
    "edges": "Detect the edges of the image.",
    "segmentation": "Segment the objects in the image.",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
TEXT_SUFFIXES = {".txt", ".jsonl"}
# One load serves every job.
SESSION_OPTIONS = ("model", "device", "dtype", "cpu_offload", "lora", "compile", "cuda_graphs", "jobs", "batch_size")
PATH_OPTIONS = ("image", "images", "output")  # resolved against a jobs file's folder
# Every option is SUPPRESSed in the parsers, so that the command line's values survive a subcommand's (or a job
# line's) parse; these fill in what nobody gave. None: not passed to the pipeline, whose own default applies.
DEFAULTS = dict(
    command=None, model=None, device=None, dtype=None, cpu_offload=False, lora=None, compile=False, cuda_graphs=False,
    jobs=None, output=None, seed=None, steps=None, guidance=None, size=None, negative_prompt=None, num_images=None,
    length=None, sampler=None, instruction=None, map=None, batch_size=1,
)  # fmt: skip
# Options -> the pipeline methods' keyword arguments, passed only when given, per kind of task.
IMAGE_ARGUMENTS = {
    "steps": "num_inference_steps", "guidance": "guidance_scale", "negative_prompt": "negative_prompt",
    "num_images": "num_images_per_prompt",
}  # fmt: skip
TEXT_ARGUMENTS = {"steps": "num_inference_steps", "length": "length", "sampler": "sampler"}


class UsageError(UserError):
    """A user mistake (a bad file, option or job line), reported in one line without a traceback."""


class _JobParser(argparse.ArgumentParser):
    """Parses job lines: an error becomes a UsageError for that line instead of ending the program."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    height, width = int(parts[0]), int(parts[-1])
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"height and width must be positive, got {text}")
    return height, width


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return Path(text)


def _model(text: str) -> str:
    """A folder, or a hub repo id ("org/name") to find in huggingface_hub's cache (`model_folder`)."""
    if not Path(text).is_dir() and not is_repo_id(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser):
    """The command line's parser and its subcommands' parsers (which also parse job lines)."""
    options = dict(argument_default=argparse.SUPPRESS, allow_abbrev=False, add_help=False)
    session = argparse.ArgumentParser(**options)
    session.add_argument("--model", type=_model, help="a pipeline folder, a training run folder, or a hub repo id")
    session.add_argument("--device", help="default: cuda when available, else cpu")
    session.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda")
    session.add_argument("--cpu-offload", action="store_true", help="diffusers' model CPU offload")
    session.add_argument("--lora", type=Path, help="LoRA adapters to apply (a file, or a folder holding one)")
    session.add_argument(
        "--compile",
        action="store_true",
        help="compiled blocks, channels-last VAE (faster after warm-up)",
    )
    session.add_argument("--cuda-graphs", action="store_true", help="with --compile: CUDA graphs (fixed sizes)")
    sampling = argparse.ArgumentParser(**options)
    sampling.add_argument("--seed", type=int, help="default: a fresh random seed")
    sampling.add_argument("--steps", type=_positive, help="default: the pipeline method's (28 images, 64 texts)")
    sampling.add_argument("--size", type=_size, help="N or HxW, multiples of the model's VAE x patch (default 512)")
    guidance = argparse.ArgumentParser(**options)
    guidance.add_argument("--guidance", type=float, help="default: the pipeline method's (t2i 7.0, edits 9.0)")
    guidance.add_argument("--negative-prompt", type=_text, help="default: the null prompt")
    guidance.add_argument("--num-images", type=_positive, help="images per prompt (default 1)")
    image_output = argparse.ArgumentParser(**options)
    image_output.add_argument("--output", type=Path, required=True, help="an image file for one image, else a folder")
    text = argparse.ArgumentParser(**options)
    text.add_argument("--length", type=_positive, help="text tokens to sample for caption and vqa (default 256)")
    text.add_argument(
        "--sampler",
        choices=list(SAMPLER_NOISES),
        help="caption and vqa draws (default unmask_first; gumbel reproduces earlier versions' texts)",
    )
    text_output = argparse.ArgumentParser(**options)
    text_output.add_argument("--output", type=Path, help="a .txt or .jsonl file (default: stdout)")

    parser = parser_class(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[session, sampling, guidance, text],
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--jobs", type=_file, help="a JSONL file of jobs, run with one load of the model")
    parser.add_argument(
        "--batch-size", type=_positive, help="with --jobs: consecutive jobs of one task and settings per call (1)"
    )
    commands = parser.add_subparsers(dest="command", metavar="TASK")
    image_parents, text_parents = [session, sampling, guidance, image_output], [session, sampling, text, text_output]

    def add(name: str, summary: str, parents: list) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, parents=parents, argument_default=argparse.SUPPRESS)

    t2i = add("t2i", "text to image", image_parents)
    t2i.add_argument("--prompt", type=_text, action="append", required=True, help="repeat for several prompts")
    edit = add("edit", "edit an image by instruction", image_parents)
    edit.add_argument("--image", type=_file, required=True)
    edit.add_argument("--instruction", type=_text, required=True)
    perception = add("perception", "a depth, edge or segmentation map", image_parents)
    perception.add_argument("--image", type=_file, required=True)
    what = perception.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", "--map", dest="map", choices=sorted(PERCEPTION_INSTRUCTIONS))
    what.add_argument("--instruction", type=_text)
    compose = add("compose", "compose several images by instruction", image_parents)
    compose.add_argument("--images", type=_file, nargs="+", action="extend", required=True)
    compose.add_argument("--instruction", type=_text, required=True)
    caption = add("caption", "describe an image", text_parents)
    caption.add_argument("--image", type=_file, required=True)
    vqa = add("vqa", "answer a question about an image", text_parents)
    vqa.add_argument("--image", type=_file, required=True)
    vqa.add_argument("--question", type=_text, required=True)
    return parser, commands.choices


# --- one task: checked arguments -> a pipeline call -> files ------------------------------------------------------


def _load_image(path: Path) -> Image.Image:
    try:
        return load_image(path)  # decodes now, so a broken file fails here and not in the pipeline
    except IMAGE_ERRORS as error:
        raise UsageError(f"cannot read image {path}: {error}") from None


@dataclass
class Call:
    """What one task asks of the pipeline, and where its results go."""

    method: str
    kwargs: dict
    output: Path | None
    inputs: dict  # written beside texts in .jsonl output


def prepare(args: dict, size_multiple: int | None = None) -> Call:
    """Check `args` (the parsed options of one task; `size_multiple`: the model's, when known) and load its images;
    raises UsageError."""
    task, output = args["command"], args["output"]
    common = {"generator": None if args["seed"] is None else torch.Generator().manual_seed(args["seed"])}
    if args["size"] is not None:
        height, width = args["size"]
        if size_multiple is not None and (height % size_multiple or width % size_multiple):
            raise UsageError(
                f"--size {height}x{width}: height and width must be positive multiples of {size_multiple} (the "
                "model's VAE downsampling x its patch size)"
            )
        common.update(height=height, width=width)
    if output is not None:
        as_folder = task in IMAGE_TASKS and output.suffix.lower() not in IMAGE_SUFFIXES
        _check_writable(output, as_folder)
    arguments = TEXT_ARGUMENTS if task in TEXT_TASKS else IMAGE_ARGUMENTS
    common.update({name: args[option] for option, name in arguments.items() if args[option] is not None})
    if task in TEXT_TASKS:
        if output is not None and output.suffix.lower() not in TEXT_SUFFIXES:
            raise UsageError(f"--output {output}: texts are written to a .txt or .jsonl file")
        inputs = {"image": str(args["image"])}
        common["image"] = _load_image(args["image"])
        if task == "caption":
            return Call("caption", common, output, inputs)
        inputs["question"] = args["question"]
        return Call("answer", dict(common, question=args["question"]), output, inputs)

    count = (args["num_images"] or 1) * (len(args["prompt"]) if task == "t2i" else 1)
    if output.suffix.lower() in IMAGE_SUFFIXES and count > 1:
        raise UsageError(f"--output {output} is one file but this makes {count} images; give a folder")
    if output.suffix.lower() in TEXT_SUFFIXES:
        raise UsageError(f"--output {output}: images are written to an image file or a folder")
    if task == "t2i":
        return Call("text_to_image", dict(common, prompt=args["prompt"]), output, {})
    if task == "compose":
        images = [_load_image(path) for path in args["images"]]
        return Call("compose", dict(common, images=images, instruction=args["instruction"]), output, {})
    instruction = args["instruction"] or PERCEPTION_INSTRUCTIONS[args["map"]]
    return Call("edit", dict(common, image=_load_image(args["image"]), instruction=instruction), output, {})


def _check_writable(output: Path, as_folder: bool) -> None:
    """Fail now, not after the generation, when `output` (a file, or with `as_folder` a folder of files) cannot be
    written: the nearest existing path must be a folder in which a file can be created (a probe, removed at once)."""
    if output.exists() and output.is_dir() != as_folder:
        kind = "a folder" if output.is_dir() else "a file"
        raise UsageError(f"--output {output} is {kind}; give {'a folder' if as_folder else 'a file name'}")
    existing = output if as_folder else output.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output {output}: {existing} is a file, not a folder")
    folder = existing
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"--output {output}: cannot write in {folder}: {error.strerror or error}") from None


def write_results(call: Call, result) -> str:
    """Write the pipeline's images or texts; returns a note of where they went."""
    output = call.output
    if call.method not in ("caption", "answer"):
        images = result.images
        single = output.suffix.lower() in IMAGE_SUFFIXES
        paths = [output] if single else [output / f"{index:05d}.png" for index in range(len(images))]
        for image, path in zip(images, paths, strict=True):
            with atomic_path(path) as temporary:
                image.save(temporary, format=Image.registered_extensions()[path.suffix.lower()])
        return f"wrote {output}" if single else f"wrote {len(images)} image(s) to {output}"
    texts = result.texts
    if output is None:
        for text in texts:
            print(text, flush=True)
        return f"printed {len(texts)} text(s)"
    if output.suffix.lower() == ".jsonl":
        content = "".join(json.dumps({**call.inputs, "text": text}) + "\n" for text in texts)
    else:
        content = "".join(text.replace("\n", " ") + "\n" for text in texts)
    with atomic_path(output) as temporary:
        temporary.write_text(content, encoding="utf-8")
    return f"wrote {output}"


# --- jobs files ---------------------------------------------------------------------------------------------------


def read_jobs(path: Path, defaults: dict) -> list[tuple[str, dict | UsageError]]:
    """(`FILE:LINE`, the job's options or why the line is bad) for every non-blank line of a jobs file."""
    _, job_parsers = build_parser(_JobParser)
    try:
        # Newlines only: str.splitlines() also splits inside a line at U+2028 and other separators that JSON allows
        # in strings, which would break one valid line in two and shift every later line number.
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    except UnicodeDecodeError as error:
        raise UsageError(f"{path} is not a UTF-8 text file: {error}") from None
    jobs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            jobs.append((where, _parse_job(line, path.parent, job_parsers, defaults)))
        except UsageError as error:
            jobs.append((where, error))
    return jobs


def _parse_job(line: str, folder: Path, job_parsers: dict, defaults: dict) -> dict:
    try:
        job = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"not a JSON object: {error}") from None
    if not isinstance(job, dict) or job.get("task") not in job_parsers:
        raise UsageError(f"expected an object with task one of {sorted(job_parsers)}")
    task = job.pop("task")
    session = sorted(set(job) & set(SESSION_OPTIONS))
    if session:
        raise UsageError(f"{', '.join(session)}: one load serves every job, so give it on the command line")
    # The job becomes the subcommand's command line, so a job line is checked exactly as the command line is.
    argv = []
    for key, value in job.items():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str | int | float) or isinstance(item, bool):
                raise UsageError(f"{key}: expected a string, a number or a list of them, got {item!r}")
            if key in PATH_OPTIONS:
                item = folder / str(item)  # an absolute path stays as it is
            argv.append(f"--{key.replace('_', '-')}={item}")
    return {**defaults, **vars(job_parsers[task].parse_args(argv)), "command": task}


# Per-output inputs of the calls that can share one pipeline call; everything else must be equal between them.
BATCHED_INPUTS = {"caption": ("image",), "answer": ("image", "question"), "edit": ("image", "instruction")}
BATCHED_INPUTS["compose"] = ("images", "instruction")


def _batch_key(call: Call) -> tuple | None:
    """Calls with equal keys can run as one pipeline call; None: this call runs alone (t2i already takes a list of
    prompts, and several images per job would change how a seed's noise is drawn)."""
    if call.method not in BATCHED_INPUTS or call.kwargs.get("num_images_per_prompt", 1) != 1:
        return None
    shared = sorted((k, v) for k, v in call.kwargs.items() if k not in BATCHED_INPUTS[call.method] + ("generator",))
    sources = len(call.kwargs["images"]) if call.method == "compose" else 1  # a batch of compositions shares k
    return (call.method, sources, call.kwargs["generator"] is None, *shared)


def _run_batch(pipe, calls: list[Call]):
    """One pipeline call for calls of one batch key; returns one result per call, in order."""
    if len(calls) == 1:
        return [getattr(pipe, calls[0].method)(**calls[0].kwargs)]
    first = calls[0]
    kwargs = {key: [call.kwargs[key] for call in calls] for key in BATCHED_INPUTS[first.method]}
    seeded = first.kwargs["generator"] is not None  # each output keeps its own seed's noise
    generator = [call.kwargs["generator"] for call in calls] if seeded else None
    result = getattr(pipe, first.method)(**{**first.kwargs, **kwargs, "generator": generator})
    field = "texts" if first.method in ("caption", "answer") else "images"
    return [type(result)(**{field: [item]}) for item in getattr(result, field)]


def run_jobs(pipe, jobs: list[tuple[str, Call | dict]], batch_size: int = 1) -> int:
    """Run each job (a prepared call, or a job line's options) with `pipe`; returns how many failed.

    Consecutive jobs of one task with the same settings run `batch_size` at a time as one pipeline call; each keeps
    its own seed, so its output is the one it gets alone. If a batch fails, its jobs run one by one, so that the
    error is reported against the line that caused it."""
    failed = 0
    batch: list[tuple[str, Call]] = []  # pending jobs, all of key `batch_key`
    batch_key = None

    def report(where: str, message: str) -> None:
        print(f"{where}: {message}" if where else message, file=sys.stderr)

    def flush() -> int:
        pending = list(batch)
        batch.clear()
        if not pending:
            return 0
        generators = [call.kwargs.get("generator") for _, call in pending]
        states = [None if generator is None else generator.get_state() for generator in generators]
        try:
            results = _run_batch(pipe, [call for _, call in pending])
        except ValueError as error:  # the pipeline's checks of its inputs
            if len(pending) == 1:
                report(pending[0][0], f"error: {error}")
                return 1
            for generator, state in zip(generators, states, strict=True):
                if generator is not None:  # a retried job starts from its seed again
                    generator.set_state(state)
            errors = 0
            for item in pending:  # one by one, so that the error names its line
                batch.append(item)
                errors += flush()
            return errors
        errors = 0
        for (where, call), result in zip(pending, results, strict=True):
            try:
                report(where, write_results(call, result))
            except OSError as error:  # a full disk or a folder gone read-only since the check: this job only
                report(where, f"error: cannot write {call.output}: {error}")
                errors += 1
        return errors

    for where, job in jobs:
        try:
            call = job if isinstance(job, Call) else prepare(job, pipe.size_multiple)
        except UsageError as error:
            report(where, f"error: {error}")
            failed += 1
            continue
        key = _batch_key(call)
        if batch and (key is None or key != batch_key or len(batch) >= batch_size):
            failed += flush()
        batch.append((where, call))
        batch_key = key
        if key is None or batch_size == 1:
            failed += flush()
    return failed + flush()
