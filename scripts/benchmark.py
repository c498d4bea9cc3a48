"""Speed and memory of UniAlignment with random weights: tables to paste into BENCHMARKS.md.

Builds the whole system from configs, every weight drawn at random on the device, no checkpoint read: the
frozen components through the trainer's own loader (`load_frozen_components(..., random_weights=True)`: T5-XXL's
encoder, SD3's VAE and the Qwen2.5-VL-7B teacher's vision tower and input embeddings), and the transformer at the
authors' SD3-medium config, DeepSpeed, the EMA and the objective through the trainer's own `build_training`. Then,
in this order (a run cut short still has the first):

0. the GPU's reachable bf16 matmul peak (an 8192^3 product), which MFU is reported against besides the data sheet;
1. sampling through `UniAlignmentPipeline`: text-to-image latency at 512 and 1024 px (28 steps, and SemGen-Bench's
   50), caption latency and throughput, eager and with `enable_fast_sampling` (compiled blocks, channels-last VAE,
   then CUDA graphs), and peak memory with every model on the GPU, with model and with sequential CPU offload;
2. training: the trainer's own optimizer step (`unialignment.training.step.optimizer_step`: the frozen components
   or the cache, the objective, DeepSpeed's backward and step, the EMA update, the metrics reduced) on
   text-to-image and edit micro-batches, with the frozen components online, their outputs from the feature cache
   ("cache"; T5 still encodes the noisy caption), or a prepared batch with T5 stubbed out ("transformer"); with
   the config's `speed` switches ("plain"), each lever alone, and all of them (`unialignment.benchmark.workload`);
3. model FLOPs per training sample (unialignment/training/flops.py; the formula is printed), MFU and HFU.

    python scripts/benchmark.py                                   # full size, one CUDA GPU, about 6 minutes
    python scripts/benchmark.py --sections train --levers plain,all --out runs/benchmark_train
    python scripts/benchmark.py --tiny                            # toy components, CPU, seconds: the CI smoke run

Each row is written to `--out`/rows/ as JSON the moment it finishes, so a run stopped by a timeout keeps every row
done; `results.json` and `results.md` (the tables, also printed) come at the end. Rows that would start after
`--time-budget` seconds are recorded as skipped. Warm-up steps and runs are not timed; the device is synchronised
around every timing; peak memory is `torch.cuda.max_memory_allocated` since the row started, every resident model
counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import deepspeed
import diffusers
import torch
import transformers

from unialignment.benchmark.full_size import (
    frozen_settings,
    parameter_count,
    transformer_kwargs,
    write_full_size_folders,
)
from unialignment.benchmark.report import flops_rows, goals, markdown
from unialignment.benchmark.workload import (
    COMPILING_LEVERS,
    FEATURE_MODES,
    LEVERS,
    Deadline,
    benchmark_sampling,
    benchmark_training,
    build_pipeline,
    free_memory,
    matmul_peak_tflops,
    token_counts,
    training_plan,
)
from unialignment.frozen.components import DTYPES, load_frozen_components
from unialignment.models import UniAlignmentTransformer
from unialignment.toy.components import make_tiny_components
from unialignment.training.builders import build_training, seed_run
from unialignment.training.config import TrainConfig, load_config
from unialignment.training.distributed import init_distributed

REPO = Path(__file__).resolve().parents[1]

# Defaults that differ between the full size and --tiny (configs/debug.py, the tiny transformer the debug run trains,
# with the toy T5, VAE and teacher), which has to stay quick enough for CI.
MODES = {
    "full": dict(
        config="configs/stage1_t2i_caption.py",
        resolutions=[512, 1024],
        image_resolutions=[512, 1024],
        warmup_steps=2,
        steps=4,
        caption_batches=[1, 32, 64],
        repeats=3,
        levers=list(LEVERS),
        time_budget=330.0,
        matmul_size=8192,
    ),
    "tiny": dict(
        config="configs/debug.py",
        resolutions=[32, 64],
        image_resolutions=[64],
        warmup_steps=1,
        steps=2,
        caption_batches=[1, 16],
        repeats=2,
        # Compilation takes minutes on a CPU: tests/test_speed.py and tests/test_fast_sampling.py check it instead.
        levers=[name for name in LEVERS if name not in COMPILING_LEVERS] + ["all"],
        time_budget=None,
        matmul_size=512,
    ),
}


# --- the command line -----------------------------------------------------------------------------------------------


def comma_list(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(item) for item in text.split(",") if item]

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the toy components at a tiny size: the CI smoke run")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full size without a GPU anyway (very slow)")
    parser.add_argument("--config", help="training config (default configs/stage1_t2i_caption.py; --tiny: debug.py)")
    parser.add_argument("--sections", type=comma_list(str), default=["sampling", "train"])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="rows/*.json, results.{json,md}")
    parser.add_argument(
        "--time-budget", type=float, help="seconds after which no row starts (default 330; --tiny: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="data-sheet dense bf16 peak (H100/H200: 989)")
    training = parser.add_argument_group("training (section train)")
    training.add_argument("--tasks", type=comma_list(str), default=["t2i", "edit"])
    training.add_argument("--resolutions", type=comma_list(int), help="default 512,1024 (--tiny: 32,64)")
    training.add_argument(
        "--features", type=comma_list(str), default=list(FEATURE_MODES), help="of " + ", ".join(FEATURE_MODES)
    )
    training.add_argument("--levers", type=comma_list(str), help="lever sets, of: " + ", ".join(LEVERS))
    training.add_argument("--micro-batch", type=int, help="default: the config's batch.micro_batch_size")
    training.add_argument("--accumulation", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    training.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="default: the config's")
    training.add_argument("--warmup-steps", type=int, help="untimed optimizer steps per row (default 2; --tiny: 1)")
    training.add_argument("--steps", type=int, help="timed optimizer steps per row (default 4; --tiny: 2)")
    sampling = parser.add_argument_group("sampling (section sampling)")
    sampling.add_argument("--image-resolutions", type=comma_list(int), help="default 512,1024 (--tiny: 64)")
    sampling.add_argument("--t2i-steps", type=int, default=28)
    sampling.add_argument("--semgen-steps", type=int, default=50, help="SemGen-Bench's setting")
    sampling.add_argument("--guidance-scale", type=float, default=7.0)
    sampling.add_argument("--caption-length", type=int, help="tokens per caption (default: the config's text length)")
    sampling.add_argument("--caption-steps", type=int, default=64)
    sampling.add_argument("--caption-batches", type=comma_list(int), help="default 1,32,64 (--tiny: 1,16)")
    sampling.add_argument("--no-fast-sampling", dest="fast_sampling", action="store_false", help="eager rows only")
    sampling.add_argument("--inference-dtype", choices=["bfloat16", "float32"], help="default bfloat16 (CPU: float32)")
    sampling.add_argument("--warmup-runs", type=int, default=1)
    sampling.add_argument("--repeats", type=int, help="timed runs per row, the median reported (default 3; --tiny: 2)")
    args = parser.parse_args(argv)

    defaults = MODES["tiny" if args.tiny else "full"]
    for name in defaults:
        if getattr(args, name, None) is None:
            setattr(args, name, defaults[name])
    for name, values, known in (
        ("--sections", args.sections, ("sampling", "train")),
        ("--tasks", args.tasks, ("t2i", "edit")),
        ("--features", args.features, tuple(FEATURE_MODES)),
        ("--levers", args.levers, tuple(LEVERS)),
    ):
        unknown = sorted(set(values) - set(known))
        if unknown or not values:
            parser.error(f"{name}: {unknown or 'nothing'} given; choose from {', '.join(known)}")
    return args


def training_config(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """The stage config with random weights and the benchmark's batch; global batch = micro x accumulation x ranks."""
    path = REPO / args.config if not Path(args.config).is_absolute() else Path(args.config)
    micro_batch = args.micro_batch or load_config(path).batch.micro_batch_size
    overrides = {
        "model.load_from": None,
        "resume_from": None,
        "batch.micro_batch_size": micro_batch,
        "batch.global_batch_size": micro_batch * args.accumulation * world_size,
        "logging.peak_tflops": args.peak_tflops,
    }
    if args.zero_stage is not None:
        overrides["deepspeed.zero_stage"] = args.zero_stage
    return load_config(path, overrides)


def environment(argv: list[str], device: torch.device, tiny: bool) -> dict:
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"CPU {platform.machine()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=name,
        python=platform.python_version(),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        deepspeed=deepspeed.__version__,
        command=shlex.join(["python", "scripts/benchmark.py", *argv]),
        tiny=tiny,
    )


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny and not args.allow_cpu:
        raise SystemExit(
            "scripts/benchmark.py: the full-size benchmark needs a CUDA GPU (a 2.1 B transformer in training, T5-XXL "
            "and the Qwen2.5-VL-7B teacher) and none is visible. Run it with --tiny for the CPU smoke check, or pass "
            "--allow-cpu to run the full size on the CPU anyway (hours, and tens of GB of memory)."
        )
    deadline = Deadline(args.time_budget)
    if args.tiny and not torch.cuda.is_available():
        # Tiny tensors: handing each op to a pool of threads costs more than the arithmetic, and threads that spin
        # while waiting for a busy core make a shared CI machine many times slower.
        torch.set_num_threads(1)
    ctx = init_distributed()
    if ctx.world_size != 1:
        raise SystemExit("scripts/benchmark.py measures one device: run it as a single process, not under a launcher.")
    config = training_config(args, ctx.world_size)
    emit = row_writer(args.out)
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    args.matmul_tflops = matmul_peak_tflops(ctx.device, args.matmul_size, dtype)
    with tempfile.TemporaryDirectory() as folder:
        folders = make_tiny_components(Path(folder)) if args.tiny else write_full_size_folders(Path(folder))
        components = load_frozen_components(frozen_settings(folders, config), ctx.device, random_weights=not args.tiny)
    results, token_table = describe_setup(argv, args, config, components, ctx.device)
    results["matmul"] = dict(size=args.matmul_size, dtype=str(dtype).removeprefix("torch."), tflops=args.matmul_tflops)
    emit("header", {key: value for key, value in results.items() if key != "model_config"})
    if "sampling" in args.sections:
        run_sampling(results, args, config, components, ctx.device, deadline, emit)
    if "train" in args.sections:
        run_training(results, token_table, args, config, components, ctx, deadline, emit)
    if not args.tiny:
        results["goals"] = goals(results)

    report = markdown(results)
    print(report)
    saved = {**results, "model_config": dict(results["model_config"])}
    (args.out / "results.json").write_text(json.dumps(saved, indent=1, default=str) + "\n")
    (args.out / "results.md").write_text(report)
    return results


def row_writer(folder: Path) -> Callable[[str, dict], None]:
    """A function that writes each row to `folder`/rows/NN-section.json as soon as it is measured."""
    rows = folder / "rows"
    rows.mkdir(parents=True, exist_ok=True)
    for stale in rows.glob("*.json"):  # rows of an earlier run must not pass for this one's
        stale.unlink()
    count = [0]

    def emit(section: str, row: dict) -> None:
        path = rows / f"{count[0]:03d}-{section}.json"
        path.write_text(json.dumps({"section": section, **row}, indent=1, default=str) + "\n")
        count[0] += 1

    return emit


def describe_setup(argv: list[str], args: argparse.Namespace, config, components, device) -> tuple[dict, dict]:
    """The results' header, sizes and FLOP rows, from the transformer's config on the meta device (nothing built),
    and the token counts of every (task, resolution) row."""
    with torch.device("meta"):
        meta_transformer = UniAlignmentTransformer(**transformer_kwargs(config, components.t5.vocab_size))
    model_config = meta_transformer.config
    width = model_config.num_attention_heads * model_config.attention_head_dim
    token_table = {
        (task, resolution): token_counts(task, resolution, components, model_config)
        for resolution in args.resolutions
        for task in args.tasks
    }
    results = dict(
        header=environment(argv, device, args.tiny),
        setup=dict(
            parameters=dict(
                transformer=parameter_count(meta_transformer),
                t5=parameter_count(components.t5.encoder),
                vae=parameter_count(components.vae.vae),
                teacher=parameter_count(components.teacher.model),
            ),
            transformer=f"{model_config.num_layers} blocks, width {width}, text head {model_config.vocab_size}",
            components_dtype=config.components.dtype,
        ),
        model_config=model_config,
        peak_tflops=args.peak_tflops,
        flops=flops_rows(model_config, token_table),
    )
    return results, token_table


def run_training(
    results: dict, token_table: dict, args: argparse.Namespace, config, components, ctx, deadline, emit
) -> None:
    """The training rows, through the trainer's own builders and optimizer step."""
    # Built on the device: 2.1 B parameters initialise there in a moment, on the CPU in tens of seconds.
    rig, _ = build_training(config, components, ctx, seed_run(config, ctx.rank), init_device=ctx.device)
    rig.engine.train()
    precision = "bf16 compute, fp32 master weights" if config.deepspeed.precision == "bf16" else "fp32"
    results["setup"]["training"] = (
        f"{args.config}; DeepSpeed ZeRO-{config.deepspeed.zero_stage}, {precision}, AdamW, clip "
        f"{config.optimizer.clip_grad_norm}, EMA {config.ema_decay}; {rig.accumulation} micro-step(s) per optimizer "
        f"step; the config's `speed`: {config.speed}; {args.warmup_steps} warm-up + {args.steps} timed optimizer "
        "steps per row; synthetic batches, collated beforehand (the DataLoader's workers do that in training)"
    )
    plan = training_plan(args, config.batch.micro_batch_size)
    results["training"] = benchmark_training(rig, plan, token_table, args, deadline, emit)
    rig.engine.destroy()
    del rig
    free_memory(ctx.device)


def run_sampling(results: dict, args: argparse.Namespace, config, components, device, deadline, emit) -> None:
    """The text-to-image, captioning and memory rows, through the pipeline."""
    inference_dtype = DTYPES[args.inference_dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    pipeline = build_pipeline(config, components, device, inference_dtype, args.seed)
    args.caption_length = args.caption_length or components.t5.max_length
    results["setup"]["sampling"] = (
        f"transformer in {str(inference_dtype).removeprefix('torch.')}, T5 and VAE in {config.components.dtype}; "
        f"{args.warmup_runs} warm-up + {args.repeats} timed runs per row, the median reported; a call includes "
        "encoding the prompts or images and decoding the outputs; captions with the default sampler (unmask_first)"
    )
    results.update(benchmark_sampling(pipeline, args, deadline, emit))
    pipeline.remove_all_hooks()
    del pipeline
    free_memory(device)


if __name__ == "__main__":
    main()
