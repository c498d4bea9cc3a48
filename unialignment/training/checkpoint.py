"""Checkpoints of a run folder: full training state for exact resume, and `from_pretrained` exports.

`<work_dir>/checkpoints/<tag>/` holds DeepSpeed's checkpoint (weights, optimizer, scheduler, and the client
state: step, sampler state), `ema.safetensors` (the whole EMA, which any world size can shard) and, per rank,
`rank_<r>.pt` (every RNG state). The file
`checkpoints/latest` names the newest complete checkpoint; it is replaced atomically only after every rank has
finished writing, so a crash or kill mid-save leaves the previous checkpoint in charge. Older checkpoints beyond
`keep_last` are removed after that. `<work_dir>/export/<tag>/{ema,raw}` are transformer folders loadable with
`UniAlignmentTransformer.from_pretrained`; `export/ema` and `export/raw` point at the newest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file

from unialignment.files import atomic_path
from unialignment.pipelines.pipeline_unialignment import LORA_WEIGHTS

LATEST = "latest"
EMA_FILE = "ema.safetensors"  # the whole EMA, in each checkpoint folder
UNIVERSAL = "universal"  # DeepSpeed's universal checkpoint of a checkpoint, made when another world size resumes it
logger = logging.getLogger("unialignment.train")


def checkpoint_root(work_dir: str | Path) -> Path:
    return Path(work_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    pointer = checkpoint_root(work_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoint_root(work_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def resolve_resume(resume_from: str | None, work_dir: str | Path) -> Path | None:
    """ "auto" -> the run folder's latest checkpoint if there is one; a path -> that checkpoint (or the latest of
    that run folder); None -> start fresh."""
    if resume_from is None:
        return None
    if resume_from == "auto":
        return latest_checkpoint(work_dir)
    path = Path(resume_from)
    if (path / "checkpoints" / LATEST).is_file():
        return latest_checkpoint(path)
    if (path / LATEST).is_file():
        return latest_checkpoint(path.parent)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from: no checkpoint at {path}")
    return path


def write_latest(work_dir: str | Path, tag: str) -> None:
    """Point `latest` at `tag` atomically (write a temporary file, then rename over the old pointer)."""
    with atomic_path(checkpoint_root(work_dir) / LATEST) as temporary:
        temporary.write_text(tag)


def prune_checkpoints(work_dir: str | Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` checkpoints (never the one `latest` names) and their exports (never
    the one `export/ema` or `export/raw` points at); returns the checkpoints that went."""
    root = checkpoint_root(work_dir)
    latest = latest_checkpoint(work_dir)
    folders = sorted(p for p in root.glob("step_*") if p.is_dir())
    removed = [p for p in folders[: max(0, len(folders) - keep_last)] if p != latest]
    export_root = Path(work_dir) / "export"
    pointed = {
        os.readlink(export_root / kind).split("/")[0] for kind in ("ema", "raw") if (export_root / kind).is_symlink()
    }
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.name not in pointed:
            shutil.rmtree(export_root / folder.name, ignore_errors=True)
    return removed


def remove_checkpoint(work_dir: str | Path, tag: str) -> None:
    """Remove checkpoint `tag` and its export (an incomplete one, after a failed save)."""
    shutil.rmtree(checkpoint_root(work_dir) / tag, ignore_errors=True)
    shutil.rmtree(Path(work_dir) / "export" / tag, ignore_errors=True)


def rng_state(generator: torch.Generator) -> dict:
    """Every random state of this process, as tensors and plain values only (so it loads with weights_only)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        numpy_state = (numpy_state["name"], keys, numpy_state["position"], numpy_state["has_gauss"],
                       numpy_state["cached_gaussian"])  # fmt: skip
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def saved_world_size(folder: Path) -> int:
    """How many ranks wrote a checkpoint: one `rank_<r>.pt` each."""
    count = len(list(folder.glob("rank_*.pt")))
    if count == 0:
        raise FileNotFoundError(f"{folder} holds no rank_<r>.pt files: it is not a complete checkpoint of a run")
    return count


def seed_new_rank(seed: int, step: int, rank: int, generator: torch.Generator) -> None:
    """Random states for a rank a checkpoint did not have (resuming on more ranks): drawn from the run's seed, the
    step and the rank, so that a rerun of the same resume makes the same draws."""
    base = seed * 1_000_003 + step * 1009 + rank
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)
    generator.manual_seed(base + 1)


def convert_to_universal(folder: Path) -> Path:
    """DeepSpeed's universal checkpoint of checkpoint `folder` in `folder/universal` (made once): ZeRO's optimizer
    partitions merged per parameter, so that any number of ranks can load them (`load_universal_checkpoint`). Written
    under a temporary name and renamed, so an interrupted conversion is redone, never half-used."""
    target = folder / UNIVERSAL
    if (target / "zero").is_dir():
        return target
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # only a changed world size needs it

    partial = folder / f".{UNIVERSAL}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    arguments = dict(
        input_folder=str(folder), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
        # A data-parallel model needs no tensor- or pipeline-parallel layout: DeepSpeed's default description of the
        # checkpoint's parameters (which it does not save for a plain module) is the right one.
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    logger.info("converting %s to a universal checkpoint (another world size resumes it)", folder)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
        ds_to_universal(argparse.Namespace(**arguments))
    os.replace(partial, target)
    return target


def save_rank_state(folder: Path, rank: int, state: dict) -> None:
    torch.save(state, folder / f"rank_{rank}.pt")


def load_rank_state(folder: Path, rank: int) -> dict:
    path = folder / f"rank_{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by fewer ranks than this run has, or is incomplete"
        )
    try:  # our own file: tensors and plain values only, so nothing in it can run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Written before the random states were stored as tensors (numpy arrays need the full unpickler). A checkpoint
        # folder is trusted like code anyway: DeepSpeed's own files in it are full pickles.
        logger.warning("%s predates weights_only-safe rank states; loading it with the full unpickler", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def point_export(work_dir: str | Path, tag: str) -> None:
    """Make `export/ema` and `export/raw` point at the newest export (relative symlinks, replaced atomically)."""
    export_root = Path(work_dir) / "export"
    for kind in ("ema", "raw"):
        if not (export_root / tag / kind).is_dir():
            continue
        temporary = export_root / f".{kind}.tmp"
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        temporary.symlink_to(Path(tag) / kind, target_is_directory=True)
        os.replace(temporary, export_root / kind)


def lora_metadata(peft_config) -> dict[str, str]:
    """safetensors metadata of a LoRA file in diffusers' layout: the adapter's config (rank, alpha, targets), keyed
    `transformer.<field>`, so that `load_lora_adapter(..., prefix="transformer")` rebuilds the same scaling."""
    fields = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    return {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(fields, sort_keys=True, default=str)}


def with_ema(raw: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], lora: bool) -> dict[str, torch.Tensor]:
    """The model's state with the EMA's averages in place of the trained parameters. The EMA averages trainable
    parameters only: buffers (the position table) and, for a full model, anything else come from `raw`; a LoRA
    export holds the adapters alone."""
    return {**{k: v for k, v in raw.items() if k not in ema and not lora}, **ema}


def export_weights(
    work_dir: str | Path, tag: str, module, raw: dict | None, ema: dict | None, lora: bool
) -> list[Path]:
    """Write `export/<tag>/raw` and `export/<tag>/ema` as transformer folders (`module`'s config and the weights;
    LoRA runs: the adapter weights alone, in diffusers' LoRA file layout). `ema` holds the averaged parameters only;
    buffers (the position table) come from `raw`. `point_export` moves `export/{raw,ema}` to them once the
    checkpoint is complete (after `latest`), so that an export never points past the last complete checkpoint."""
    folder = Path(work_dir) / "export" / tag
    written = []
    for kind, state in (("raw", raw), ("ema", ema)):
        if state is None:
            continue
        if kind == "ema":
            state = with_ema(raw, state, lora)
        if lora:  # diffusers' LoRA file layout: adapter tensors only, "transformer."-prefixed, no adapter name
            state = {f"transformer.{n.replace('.default', '')}": t for n, t in state.items() if "lora_" in n}
        target = folder / kind
        target.mkdir(parents=True, exist_ok=True)
        module.save_config(target)
        # clone: DeepSpeed keeps parameters as views of one flat buffer, which safetensors refuses to save
        tensors = {name: tensor.detach().cpu().clone() for name, tensor in state.items()}
        broken = [
            name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()
        ]
        if broken:  # never hand on weights that cannot be right
            raise RuntimeError(f"{kind} weights at {tag} are not finite ({len(broken)} tensors, e.g. {broken[0]})")
        if lora:  # with the adapter's rank, alpha and targets, which diffusers' load_lora_adapter reads back
            save_file(tensors, target / LORA_WEIGHTS, metadata=lora_metadata(module.peft_config["default"]))
        else:
            save_torch_state_dict(tensors, target, filename_pattern="diffusion_pytorch_model{suffix}.safetensors")
        written.append(target)
    return written
