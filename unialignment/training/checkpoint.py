"""Checkpoints of a run folder: full training state for exact resume, and `from_pretrained` exports.

`<work_dir>/checkpoints/<tag>/` holds DeepSpeed's checkpoint (weights, optimizer, scheduler, and the client
state: step, sampler state) and, per rank, `rank_<r>.pt` (the EMA shard and every RNG state). The file
`checkpoints/latest` names the newest complete checkpoint; it is replaced atomically only after every rank has
finished writing, so a crash or kill mid-save leaves the previous checkpoint in charge. Older checkpoints beyond
`keep_last` are removed after that. `<work_dir>/export/<tag>/{ema,raw}` are transformer folders loadable with
`UniAlignmentTransformer.from_pretrained`; `export/ema` and `export/raw` point at the newest.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import save_torch_state_dict

from unialignment.files import atomic_path

LATEST = "latest"


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
    """Remove all but the newest `keep_last` checkpoints (never the one `latest` names); returns what went."""
    root = checkpoint_root(work_dir)
    latest = latest_checkpoint(work_dir)
    folders = sorted(p for p in root.glob("step_*") if p.is_dir())
    removed = [p for p in folders[: max(0, len(folders) - keep_last)] if p != latest]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def rng_state(generator: torch.Generator) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(folder: Path, rank: int, state: dict) -> None:
    torch.save(state, folder / f"rank_{rank}.pt")


def load_rank_state(folder: Path, rank: int) -> dict:
    path = folder / f"rank_{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint was written by fewer ranks than this run has, or is incomplete"
        )
    # Our own file, holding numpy RNG state and Python tuples as well as tensors.
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


def export_weights(
    work_dir: str | Path, tag: str, module, raw: dict | None, ema: dict | None, lora: bool
) -> list[Path]:
    """Write `export/<tag>/raw` and `export/<tag>/ema` as transformer folders (`module`'s config and the weights;
    LoRA runs: the adapter weights alone, in diffusers' LoRA file layout), then point `export/{raw,ema}` at them.
    `ema` holds the averaged parameters only; buffers (the position table) come from `raw`."""
    folder = Path(work_dir) / "export" / tag
    written = []
    for kind, state in (("raw", raw), ("ema", ema)):
        if state is None:
            continue
        if kind == "ema":
            state = {**{k: v for k, v in raw.items() if k not in state and not lora}, **state}
        if lora:  # diffusers' LoRA file layout: adapter tensors only, "transformer."-prefixed, no adapter name
            state = {f"transformer.{n.replace('.default', '')}": t for n, t in state.items() if "lora_" in n}
        target = folder / kind
        target.mkdir(parents=True, exist_ok=True)
        module.save_config(target)
        pattern = "pytorch_lora_weights{suffix}.safetensors" if lora else "diffusion_pytorch_model{suffix}.safetensors"
        # clone: DeepSpeed keeps parameters as views of one flat buffer, which safetensors refuses to save
        tensors = {name: tensor.detach().cpu().clone() for name, tensor in state.items()}
        save_torch_state_dict(tensors, target, filename_pattern=pattern)
        written.append(target)
    point_export(work_dir, tag)
    return written
