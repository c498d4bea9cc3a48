"""The tiny frozen components (T5, VAE, teacher) built into one folder, each loadable with `from_pretrained`
through the same code as the full-size ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unialignment.frozen.teacher import QwenVLTeacher
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.frozen.vae import FrozenVAE
from unialignment.toy.t5 import make_tiny_t5
from unialignment.toy.teacher import make_tiny_teacher
from unialignment.toy.vae import make_tiny_vae


@dataclass
class TinyComponentFolders:
    tokenizer: Path
    text_encoder: Path
    vae: Path
    teacher: Path


def make_tiny_components(folder: Path) -> TinyComponentFolders:
    """Build every tiny frozen component under `folder`; an already built folder is reused."""
    folder = Path(folder)
    folders = TinyComponentFolders(folder / "tokenizer", folder / "text_encoder", folder / "vae", folder / "teacher")
    if not (folders.text_encoder / "config.json").is_file():
        make_tiny_t5(folder)
    if not (folders.vae / "config.json").is_file():
        make_tiny_vae(folders.vae)
    if not (folders.teacher / "config.json").is_file():
        make_tiny_teacher(folders.teacher)
    return folders


@dataclass
class TinyComponents:
    t5: FrozenT5
    vae: FrozenVAE
    teacher: QwenVLTeacher


def load_tiny_components(folders: TinyComponentFolders, max_text_length: int = 32) -> TinyComponents:
    return TinyComponents(
        t5=FrozenT5.from_pretrained(folders.tokenizer, folders.text_encoder, max_length=max_text_length),
        vae=FrozenVAE.from_pretrained(folders.vae),
        teacher=QwenVLTeacher.from_pretrained(folders.teacher, torch_dtype=torch.float32),
    )
