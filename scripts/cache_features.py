"""Precompute the frozen components' outputs for JSONL datasets (the offline feature cache).

For every valid record: the VAE posterior (mean, std) of the target and condition images, the T5 states of the
prompt, and the alignment teacher's image and text targets, written as sharded safetensors beside the data
(`.<file>.features/<resolution>px/`). Training with `use_feature_cache=True` then reads them instead of running
the VAE, T5 and the teacher, and draws fresh latents from the stored posterior as online encoding would.

    python scripts/cache_features.py data/t2i.jsonl data/edit.jsonl --resolution 512 \\
        --tokenizer sd3/tokenizer_3 --text-encoder sd3/text_encoder_3 --vae sd3/vae --teacher Qwen2.5-VL-7B-Instruct
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from unialignment.data.feature_cache import write_feature_cache
from unialignment.data.features import FrozenComponents
from unialignment.data.jsonl_index import JsonlIndex
from unialignment.data.records import TaskKind
from unialignment.frozen.teacher import QwenVLTeacher
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.frozen.vae import FrozenVAE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", type=Path, help="JSONL files")
    parser.add_argument("--task", default=None, help="the files' task kind (default: inferred per record)")
    parser.add_argument("--image-root", default=None, help="folder that relative image paths resolve against")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="T5 tokenizer folder (SD3: tokenizer_3)")
    parser.add_argument("--text-encoder", type=Path, required=True, help="T5 encoder folder (SD3: text_encoder_3)")
    parser.add_argument("--mask-embedding", type=Path, default=None, help="learned mask-token embedding file")
    parser.add_argument("--vae", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, default=None, help="Qwen2.5-VL folder; omit to cache no targets")
    parser.add_argument("--text-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16" if torch.cuda.is_available() else "float32"
    )
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    components = FrozenComponents(
        t5=FrozenT5.from_pretrained(
            args.tokenizer, args.text_encoder, dtype, args.device, args.mask_embedding, args.text_length
        ),
        vae=FrozenVAE.from_pretrained(args.vae, dtype, args.device),
        teacher=None if args.teacher is None else QwenVLTeacher.from_pretrained(args.teacher, dtype, args.device),
    )
    task = TaskKind.parse(args.task) if args.task else None
    for path in args.data:
        index = JsonlIndex.build_or_load(path, task, image_root=args.image_root)
        folder = write_feature_cache(index, components, args.resolution, args.batch_size, args.shard_size)
        print(f"{path}: {len(index)} records cached in {folder} ({index.num_skipped} lines skipped at indexing)")


if __name__ == "__main__":
    main()
