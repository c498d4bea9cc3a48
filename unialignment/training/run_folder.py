"""Reading a training run folder from outside the run: its exported transformers and the frozen components its
merged config names, assembled into a pipeline; and `load_pipeline`, which takes a pipeline folder or a run folder.

Used by `inference.py --model`, `scripts/export_pipeline.py` and SemGen-Bench.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from unialignment.files import model_folder
from unialignment.frozen.components import ComponentsConfig
from unialignment.frozen.vae import downsample_factor
from unialignment.pipelines import UniAlignmentPipeline
from unialignment.pipelines.assembly import ExportError, build_pipeline
from unialignment.pipelines.pipeline_unialignment import LORA_WEIGHTS
from unialignment.training.builders import transformer_folder
from unialignment.training.checkpoint import tag_for_step
from unialignment.training.config import TrainConfig, load_config_json


def is_run_folder(path: str | Path) -> bool:
    """A training run folder: the trainer's merged config (`config.json`, or `config.py` in folders written before
    the JSON), and not a pipeline folder."""
    path = Path(path)
    has_config = (path / "config.json").is_file() or (path / "config.py").is_file()
    return has_config and not (path / "model_index.json").is_file()


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


def run_config(run: Path) -> TrainConfig:
    """The merged config the trainer wrote into the run folder as `config.json`. The folder's `config.py` is never
    read: an mmengine config is Python, and reading a folder must not run its code."""
    config_file = Path(run) / "config.json"
    if not config_file.is_file():
        raise ExportError(
            f"{run} has no config.json (the trainer writes it; a run folder from before it has only config.py, "
            "which is Python and is not executed): export its transformer with scripts/export_pipeline.py "
            "--transformer FOLDER and the component folders instead"
        )
    return load_config_json(config_file)


def run_components(run: Path) -> ComponentsConfig:
    """The `components` section of the run's merged config (`run_config`)."""
    return run_config(run).components


def pipeline_from_run(
    run: str | Path,
    weights: str = "ema",
    step: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    merge_lora: bool = False,
) -> UniAlignmentPipeline:
    """The pipeline of a training run's export, built in memory (nothing written). A LoRA run's export holds the
    adapters alone: they are applied to the run's base transformer (`model.load_from`), and with `merge_lora`
    fused into its weights."""
    config = run_config(Path(run))
    transformer = run_transformer_folder(Path(run), weights, step)
    if not (transformer / LORA_WEIGHTS).is_file():
        return build_pipeline(transformer, config.components, torch_dtype=torch_dtype)
    pipe = build_pipeline(lora_base_folder(config, run), config.components, torch_dtype=torch_dtype)
    pipe.load_lora_weights(transformer)
    if merge_lora:
        pipe.transformer.fuse_lora()
        pipe.transformer.unload_lora()
    return pipe


def lora_base_folder(config: TrainConfig, run: str | Path) -> Path:
    """The transformer folder a LoRA run trained its adapters on: `model.load_from`, a UniAlignment transformer."""
    if config.model.load_from is None:
        raise ExportError(
            f"{run} trained LoRA adapters on freshly initialised weights, which were never saved; only runs whose "
            "model.load_from names a UniAlignment transformer can be exported"
        )
    folder = transformer_folder(Path(config.model.load_from))
    if json.loads((folder / "config.json").read_text()).get("_class_name") == "SD3Transformer2DModel":
        raise ExportError(
            f"{run} trained LoRA adapters on SD3 weights with freshly initialised UniAlignment heads, which were "
            "never saved; export a full fine-tune instead, or train the adapters on a UniAlignment transformer"
        )
    return folder


def size_multiple_of(model: str | Path) -> int:
    """What image sides must be multiples of for `model` (a pipeline or run folder), read from its VAE's and
    transformer's configs without loading weights, so that a bad size fails before the long load."""
    model = Path(model)
    if is_run_folder(model):
        vae_folder, transformer_dir = Path(run_components(model).folder("vae")), run_transformer_folder(model)
    else:
        vae_folder, transformer_dir = model / "vae", model / "transformer"
    vae_config = json.loads((vae_folder / "config.json").read_text())
    patch_size = json.loads((transformer_dir / "config.json").read_text())["patch_size"]
    return downsample_factor(SimpleNamespace(**vae_config)) * patch_size


def load_pipeline(
    model: str | Path,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> UniAlignmentPipeline:
    """A pipeline folder (ours or the authors' layout), or a training run folder (its newest EMA export, assembled
    in memory), in `torch_dtype` (default bfloat16 on CUDA, else float32) on `device` (default CUDA when there is
    one), or with diffusers' model CPU offload onto that device."""
    model = model_folder(model, "model")
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if is_run_folder(model):
        pipe = pipeline_from_run(model, torch_dtype=torch_dtype)
    else:
        pipe = UniAlignmentPipeline.from_pretrained(Path(model), torch_dtype=torch_dtype)
    if device == "cpu":
        torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls; flushing them changes no sample visibly
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe
