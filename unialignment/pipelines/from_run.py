"""Pipelines from training runs: a run folder's exported transformer plus the frozen components its config names.

Used by `scripts/export_pipeline.py` (which saves the result) and `inference.py --model RUN_DIR` (which uses it in
memory). The frozen components come from the run's merged `config.py`; a LoRA run's adapter-only export is refused,
since fusing needs the run's exact base weights and LoRA alpha.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from unialignment.frozen.text_encoder import FrozenT5
from unialignment.models import UniAlignmentTransformer
from unialignment.pipelines.pipeline_unialignment import MASK_EMBEDDING_FILE, UniAlignmentPipeline
from unialignment.training.checkpoint import tag_for_step
from unialignment.training.config import ComponentsConfig, ConfigError, load_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPONENT_FOLDERS = {"tokenizer": "tokenizer_3", "text_encoder": "text_encoder_3", "vae": "vae"}  # name -> SD3's


class ExportError(ValueError):
    """A run, folder or option that cannot be exported; the message says what to change."""


def run_transformer_folder(run: Path, weights: str = "ema", step: str | None = None) -> Path:
    """`<run>/export/<tag>/<weights>`, or the newest export (`export/<weights>`) when `step` is None.
    `step` is a tag (`step_00040000`) or a step number."""
    export = Path(run) / "export"
    tag = None if step is None else tag_for_step(int(step)) if step.isdigit() else step
    folder = export / weights if tag is None else export / tag / weights
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in export.glob("step_*")) if export.is_dir() else []
        no_ema = weights == "ema" and folder.parent.is_dir()
        hint = " (a run with ema_decay=0 has only raw weights: --weights raw)" if no_ema else ""
        raise ExportError(f"no transformer export at {folder}{hint}; exported steps: {found or 'none'}")
    return folder


def run_components(run: Path) -> ComponentsConfig:
    """The `components` section of the merged config the trainer wrote into the run folder."""
    config_file = Path(run) / "config.py"
    if not config_file.is_file():
        raise ExportError(f"{run} is not a training run folder: it has no config.py")
    return load_config(config_file).components


def scheduler_folder(components: ComponentsConfig, explicit: str | Path | None = None) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    return Path(components.sd3) / "scheduler" if components.sd3 is not None else None


def build_pipeline(
    transformer_dir: str | Path,
    components: ComponentsConfig,
    scheduler_dir: str | Path | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> UniAlignmentPipeline:
    """A pipeline, in memory, from a transformer folder and the frozen components' folders."""
    transformer_dir = Path(transformer_dir)
    if any(transformer_dir.glob("pytorch_lora_weights*.safetensors")):
        # The adapters alone are not a model: fusing needs the exact base weights and the LoRA alpha of the run.
        raise ExportError(
            f"{transformer_dir} holds LoRA adapters only; exporting LoRA runs is not supported yet. Load the base "
            "pipeline and apply the adapters with `pipe.transformer.load_lora_adapter(...)` instead."
        )
    folders = {}
    for name, sd3_subfolder in COMPONENT_FOLDERS.items():
        try:
            folders[name] = components.folder(name, sd3_subfolder)
        except ConfigError:
            option = "--" + name.replace("_", "-")
            raise ExportError(f"no {name} folder: pass {option} or --sd3 (an SD3 pipeline folder)") from None
    # FrozenT5 loads the tokenizer with the pad token set to `</s>` and writes the learned mask embedding into
    # the encoder's input embeddings, as training saw them.
    # The prompt length the run trained with travels in the saved tokenizer (`model_max_length`).
    t5 = FrozenT5.from_pretrained(
        folders["tokenizer"],
        folders["text_encoder"],
        torch_dtype,
        mask_embedding_path=components.mask_embedding,
        max_length=components.text_length,
    )
    vae_dir = Path(folders["vae"])
    if not (vae_dir / "config.json").is_file():
        raise ExportError(f"VAE folder not found or without config.json: {vae_dir}")
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch_dtype)
    scheduler_dir = scheduler_folder(components, scheduler_dir)
    if scheduler_dir is None:
        scheduler = FlowMatchEulerDiscreteScheduler()
    elif (Path(scheduler_dir) / "scheduler_config.json").is_file():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir)
    else:
        raise ExportError(f"scheduler folder not found or without scheduler_config.json: {scheduler_dir}")
    transformer = UniAlignmentTransformer.from_pretrained(transformer_dir, torch_dtype=torch_dtype)
    return UniAlignmentPipeline(transformer, scheduler, vae, t5.encoder, t5.tokenizer)


def pipeline_from_run(
    run: str | Path, weights: str = "ema", step: str | None = None, torch_dtype: torch.dtype = torch.float32
) -> UniAlignmentPipeline:
    """The pipeline of a training run's export, built in memory (nothing written)."""
    components = run_components(Path(run))
    return build_pipeline(run_transformer_folder(Path(run), weights, step), components, torch_dtype=torch_dtype)


def load_pipeline(model: str | Path, torch_dtype: torch.dtype = torch.float32) -> UniAlignmentPipeline:
    """A pipeline folder (ours or the authors' layout), or a training run folder (its merged `config.py` and no
    `model_index.json`), whose newest EMA export is assembled in memory."""
    model = Path(model)
    if (model / "config.py").is_file() and not (model / "model_index.json").is_file():
        return pipeline_from_run(model, torch_dtype=torch_dtype)
    return UniAlignmentPipeline.from_pretrained(model, torch_dtype=torch_dtype)


def save_pipeline(
    pipe: UniAlignmentPipeline, out: Path, mask_embedding: str | Path | None = None, overwrite: bool = False
) -> None:
    """Save into a temporary sibling of `out`, then rename it into place: `out` is complete or absent."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        pipe.save_pretrained(temporary)
        if mask_embedding is not None:
            shutil.copyfile(mask_embedding, temporary / MASK_EMBEDDING_FILE)
        if out.exists():
            if not overwrite:  # checked before loading too; this covers a folder that appeared meanwhile
                raise ExportError(f"{out} exists; pass --overwrite to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(temporary, out)
            shutil.rmtree(old)
        else:
            os.replace(temporary, out)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
