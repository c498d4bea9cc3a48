"""The frozen components of a run, built from their settings in one place: T5, the VAE and the alignment teacher.

Training, the offline feature cache, pipelines assembled from a run and the benchmark all call
`load_frozen_components` with a `ComponentsConfig`, so what one of them computes is what the others compute.
With `random_weights` the folders need to hold only configs, tokenizers and the image processor: every weight is
drawn at random on the device (the benchmark's full-size components).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from unialignment.frozen.teacher import AlignmentTeacher, QwenVLTeacher
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.frozen.vae import FrozenVAE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Component -> its subfolder in an SD3 pipeline folder (SD3's third text encoder is the T5).
SD3_SUBFOLDERS = {"tokenizer": "tokenizer_3", "text_encoder": "text_encoder_3", "vae": "vae"}


class ComponentsError(ValueError):
    """A components setting that names no usable folder; the message names the setting (`setting`)."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"components.{setting}: {message}")
        self.setting = setting


@dataclass
class ComponentsConfig:
    """Local folders of the frozen components. `sd3` is a diffusers SD3 pipeline folder: its `tokenizer_3`,
    `text_encoder_3` and `vae` are used unless a folder is named explicitly."""

    sd3: str | None = None
    tokenizer: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    teacher: str | None = None  # Qwen2.5-VL folder; None trains without representation alignment
    mask_embedding: str | None = None  # the authors' learned mask-token embedding (mask_token_emb.00-of-01.pth)
    text_length: int = 256
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    teacher_average_padding: bool = True  # the reference averages padding positions of the caption too

    def folder(self, name: str) -> str:
        """The folder of component `name` ("tokenizer", "text_encoder" or "vae")."""
        explicit = getattr(self, name)
        if explicit is not None:
            return explicit
        if self.sd3 is None:
            raise ComponentsError(name, "set it, or set components.sd3 to an SD3 pipeline folder")
        return str(Path(self.sd3) / SD3_SUBFOLDERS[name])


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
        settings.mask_embedding,
        settings.text_length,
        random_weights=random_weights,
    )
    vae = FrozenVAE.from_pretrained(settings.folder("vae"), dtype, device, random_weights=random_weights)
    teacher = None
    if with_teacher and settings.teacher is not None:
        teacher = QwenVLTeacher.from_pretrained(
            settings.teacher,
            dtype,
            device,
            average_padding=settings.teacher_average_padding,
            max_text_length=settings.text_length,
            random_weights=random_weights,
        )
    return FrozenComponents(t5, vae, teacher)
