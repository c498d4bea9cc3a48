"""The frozen components of a run, built from their settings in one place: T5, the VAE and the alignment teacher.

Training, the offline feature cache, pipelines assembled from a run and the benchmark all call
`load_frozen_components` with a `ComponentsConfig`, so what one of them computes is what the others compute.
With `random_weights` the folders need to hold only configs, tokenizers and the image processor: every weight is
drawn at random on the device (the benchmark's full-size components).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from unialignment.errors import UserError
from unialignment.files import model_folder
from unialignment.frozen.teacher import AlignmentTeacher, QwenVLTeacher
from unialignment.frozen.text_encoder import MASK_EMBEDDING_FILE, FrozenT5
from unialignment.frozen.vae import FrozenVAE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Component -> its subfolder in a diffusers pipeline folder: SD3's (its third text encoder is the T5) and ours (the
# authors' release has our layout).
SD3_SUBFOLDERS = {"tokenizer": "tokenizer_3", "text_encoder": "text_encoder_3", "vae": "vae"}
PIPELINE_SUBFOLDERS = {"tokenizer": "tokenizer", "text_encoder": "text_encoder", "vae": "vae"}


class ComponentsError(UserError):
    """A components setting that names no usable folder; the message names the setting (`setting`)."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"components.{setting}: {message}")
        self.setting = setting


@dataclass
class ComponentsConfig:
    """Local folders of the frozen components. `sd3` is a diffusers pipeline folder, recognised by its
    `model_index.json`: SD3's (`tokenizer_3`, `text_encoder_3`, `vae`) or a UniAlignment one, ours or the authors'
    release (`tokenizer`, `text_encoder`, `vae`, and the learned mask embedding beside them, used unless
    `mask_embedding` names another). A folder named explicitly wins over the pipeline folder's."""

    sd3: str | None = None
    tokenizer: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    teacher: str | None = None  # Qwen2.5-VL folder; None trains without representation alignment
    mask_embedding: str | None = None  # the authors' learned mask-token embedding (mask_token_emb.00-of-01.pth)
    text_length: int = 256
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    teacher_average_padding: bool = True  # average the caption's padding positions too (see QwenVLTeacher)
    # with padding averaged: pad to text_length, or each batch to its longest caption as the authors' code does
    teacher_padding: Literal["text_length", "longest_in_batch"] = "text_length"

    def folder(self, name: str) -> str:
        """The folder of component `name` ("tokenizer", "text_encoder" or "vae")."""
        explicit = getattr(self, name)
        if explicit is not None:
            return str(model_folder(explicit, f"components.{name}"))
        if self.sd3 is None:
            raise ComponentsError(name, "set it, or set components.sd3 to an SD3 or UniAlignment pipeline folder")
        return str(self._pipeline_folder() / self._subfolders()[name])

    def mask_embedding_file(self) -> str | None:
        """`mask_embedding`, or a UniAlignment pipeline folder's own learned mask embedding, or None."""
        if self.mask_embedding is not None or self.sd3 is None or self._subfolders() is SD3_SUBFOLDERS:
            return self.mask_embedding
        beside = self._pipeline_folder() / MASK_EMBEDDING_FILE
        return str(beside) if beside.is_file() else None

    def _pipeline_folder(self) -> Path:
        """`sd3` as a local folder (a hub repo id: its snapshot in huggingface_hub's cache)."""
        return model_folder(self.sd3, "components.sd3")

    def _subfolders(self) -> dict[str, str]:
        """SD3's layout or ours, from the folder's `model_index.json` (a folder without one is taken as SD3's)."""
        index_file = self._pipeline_folder() / "model_index.json"
        if not index_file.is_file():
            return SD3_SUBFOLDERS
        index = json.loads(index_file.read_text())
        if "tokenizer_3" in index:
            return SD3_SUBFOLDERS
        if "text_encoder" in index and "transformer" in index:
            return PIPELINE_SUBFOLDERS
        raise ComponentsError("sd3", f"{index_file} is neither an SD3 pipeline's nor a UniAlignment pipeline's")


@dataclass
class FrozenComponents:
    """The frozen models of a run; `teacher` None switches the representation-alignment targets off."""

    t5: FrozenT5
    vae: FrozenVAE
    teacher: AlignmentTeacher | None = None


def load_frozen_components(
    settings: ComponentsConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    with_teacher: bool = True,
    random_weights: bool = False,
) -> FrozenComponents:
    """T5 (tokenizer, encoder, learned mask embedding, text length), the VAE and, when `settings.teacher` is set
    and `with_teacher`, the teacher (its padding rule and text length), in `dtype` (default: `settings.dtype`)."""
    dtype = DTYPES[settings.dtype] if dtype is None else dtype
    t5 = FrozenT5.from_pretrained(
        settings.folder("tokenizer"),
        settings.folder("text_encoder"),
        dtype,
        device,
        settings.mask_embedding_file(),
        settings.text_length,
        random_weights=random_weights,
    )
    vae = FrozenVAE.from_pretrained(settings.folder("vae"), dtype, device, random_weights=random_weights)
    teacher = None
    if with_teacher and settings.teacher is not None:
        teacher = QwenVLTeacher.from_pretrained(
            model_folder(settings.teacher, "components.teacher"),
            dtype,
            device,
            average_padding=settings.teacher_average_padding,
            pad_to=settings.teacher_padding,
            max_text_length=settings.text_length,
            random_weights=random_weights,
        )
    return FrozenComponents(t5, vae, teacher)
