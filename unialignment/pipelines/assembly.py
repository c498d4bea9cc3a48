"""A `UniAlignmentPipeline` assembled from a transformer folder and the frozen components' settings, and saved.

The frozen components come through `load_frozen_components`, the loader training uses, so a pipeline encodes
prompts exactly as its run did: the T5 tokenizer with pad = EOS and the run's text length (recorded in the saved
tokenizer), the learned mask embedding written into T5's input embeddings, the same VAE. The teacher is never
loaded for inference.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unialignment.errors import UserError
from unialignment.files import atomic_folder
from unialignment.frozen.components import ComponentsConfig, ComponentsError, load_frozen_components
from unialignment.frozen.text_encoder import MASK_EMBEDDING_FILE
from unialignment.models import UniAlignmentTransformer
from unialignment.pipelines.pipeline_unialignment import UniAlignmentPipeline


class ExportError(UserError):
    """A run, folder or option that cannot be exported; the message says what to change."""


def scheduler_folder(components: ComponentsConfig, explicit: str | Path | None = None) -> Path | None:
    """The scheduler to sample with: `explicit`, else the SD3 folder's (SD3-medium ships shift 3.0), else none."""
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
        # The adapters alone are not a model: they need the base transformer they were trained on.
        raise ExportError(
            f"{transformer_dir} holds LoRA adapters only: export the run with scripts/export_pipeline.py --run RUN "
            "(its base transformer and the adapters), or load a base pipeline and call pipe.load_lora_weights(...)"
        )
    try:
        frozen = load_frozen_components(components, dtype=torch_dtype, with_teacher=False)
    except ComponentsError as error:
        option = "--" + error.setting.replace("_", "-")
        raise ExportError(f"no {error.setting} folder: pass {option} or --sd3 (an SD3 pipeline folder)") from None
    scheduler_dir = scheduler_folder(components, scheduler_dir)
    if scheduler_dir is None:
        scheduler = FlowMatchEulerDiscreteScheduler()
    elif (Path(scheduler_dir) / "scheduler_config.json").is_file():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_dir)
    else:
        raise ExportError(f"scheduler folder not found or without scheduler_config.json: {scheduler_dir}")
    transformer = UniAlignmentTransformer.from_pretrained(transformer_dir, torch_dtype=torch_dtype)
    t5 = frozen.t5
    return UniAlignmentPipeline(transformer, scheduler, frozen.vae.vae, t5.encoder, t5.tokenizer)


def save_pipeline(
    pipe: UniAlignmentPipeline,
    out: Path,
    mask_embedding: str | Path | None = None,
    overwrite: bool = False,
    extra_files: list[Path] = (),
) -> None:
    """Save into a temporary sibling of `out` (with the learned mask embedding, and `extra_files` such as LoRA
    adapters, beside the components), then move it into place: `out` is complete or absent."""
    with atomic_folder(out, overwrite) as temporary:
        pipe.save_pretrained(temporary)
        if mask_embedding is not None:
            shutil.copyfile(mask_embedding, temporary / MASK_EMBEDDING_FILE)
        for path in extra_files:
            shutil.copyfile(path, temporary / Path(path).name)
