"""Turn a training run (or any UniAlignment transformer folder) into a `UniAlignmentPipeline` folder.

    python scripts/export_pipeline.py --run runs/stage3 --out pipelines/stage3          # export/ema, newest step
    python scripts/export_pipeline.py --run runs/stage3 --weights raw --step 40000 --out pipelines/stage3_raw
    python scripts/export_pipeline.py --transformer some/transformer --sd3 sd3-medium --out pipelines/mine

The frozen components (T5 tokenizer and encoder, VAE, learned mask embedding) come from the run's `config.py`
(`components.*`, SD3's subfolders when `components.sd3` is set) unless named on the command line: `--sd3` replaces
the run's folders with the SD3 folder's, and `--tokenizer`, `--text-encoder`, `--vae`, `--mask-embedding` replace
one each. The scheduler is the SD3 folder's `scheduler/` when there is an SD3 folder (SD3-medium ships shift 3.0
for sampling), else `FlowMatchEulerDiscreteScheduler()`, unless `--scheduler`. The pipeline is saved into a
temporary sibling folder and renamed into place, so OUT is never half-written. A LoRA run's export holds the
adapters alone: OUT gets the run's base transformer (`model.load_from`) with the adapters beside it
(`pytorch_lora_weights.safetensors`, applied by `inference.py --lora OUT`), or with `--merge-lora` fused into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from unialignment.errors import UserError
from unialignment.frozen.components import DTYPES, ComponentsConfig
from unialignment.frozen.text_encoder import MASK_EMBEDDING_FILE
from unialignment.pipelines.assembly import build_pipeline, save_pipeline
from unialignment.pipelines.pipeline_unialignment import LORA_WEIGHTS
from unialignment.training.run_folder import lora_base_folder, run_components, run_config, run_transformer_folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a training run folder (work_dir)")
    source.add_argument("--transformer", type=Path, help="any UniAlignment transformer folder")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema", help="with --run (default: ema)")
    parser.add_argument("--step", help="with --run: an export tag (step_00040000) or step number; default newest")
    parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--sd3", help="an SD3 pipeline folder (tokenizer_3, text_encoder_3, vae, scheduler)")
    parser.add_argument("--tokenizer", help="T5 tokenizer folder")
    parser.add_argument("--text-encoder", help="T5 encoder folder")
    parser.add_argument("--vae", help="VAE folder")
    parser.add_argument("--mask-embedding", help=f"learned mask-token embedding file ({MASK_EMBEDDING_FILE})")
    parser.add_argument("--scheduler", help="a FlowMatchEulerDiscreteScheduler folder (scheduler_config.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (default float32)")
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA run: fuse the adapters into the base transformer (default: keep them beside it, for --lora)",
    )
    args = parser.parse_args(argv)
    if args.transformer is not None and (args.step is not None or args.weights != "ema"):
        parser.error("--weights and --step go with --run")
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")

    try:
        components = run_components(args.run) if args.run is not None else ComponentsConfig()
        if args.sd3 is not None:  # a new SD3 folder replaces the run's component folders, unless named below
            components = dataclasses.replace(components, sd3=args.sd3, tokenizer=None, text_encoder=None, vae=None)
        overrides = {
            name: getattr(args, name)
            for name in ("tokenizer", "text_encoder", "vae", "mask_embedding")
            if getattr(args, name) is not None
        }
        components = dataclasses.replace(components, **overrides)
        transformer_dir = args.transformer or run_transformer_folder(args.run, args.weights, args.step)
        lora = transformer_dir / LORA_WEIGHTS
        if args.run is not None and lora.is_file():  # a LoRA run: its base transformer, and the adapters
            base = lora_base_folder(run_config(args.run), args.run)
            pipe = build_pipeline(base, components, args.scheduler, DTYPES[args.dtype])
            if args.merge_lora:
                pipe.load_lora_weights(lora)
                pipe.transformer.fuse_lora()
                pipe.transformer.unload_lora()
            extra = [] if args.merge_lora else [lora]  # beside the base weights: inference.py --lora OUT
        else:
            pipe, extra = build_pipeline(transformer_dir, components, args.scheduler, DTYPES[args.dtype]), []
        save_pipeline(pipe, args.out, components.mask_embedding_file(), args.overwrite, extra_files=extra)
    except (UserError, OSError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"pipeline written to {args.out} (transformer {transformer_dir})", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
