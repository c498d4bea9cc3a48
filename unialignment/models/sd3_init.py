"""Initialising the UniAlignment transformer from Stable Diffusion 3 (stage 1, docs/METHOD.md section 1).

SD3 tensors that exist in the UniAlignment transformer with the same shape are copied; SD3's
`norm_out` / `proj_out` become the image head; the pooled-text projection is dropped; the last block's
new text branch, the text head, the null image and the alignment heads keep their fresh initialisation.
The report says exactly which tensors went where.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from diffusers import SD3Transformer2DModel

from unialignment.models.transformer import UniAlignmentTransformer

# SD3 prefix -> UniAlignment prefix, for tensors that changed name but not meaning.
SD3_RENAMED_PREFIXES = {"norm_out.": "image_norm_out.", "proj_out.": "image_proj_out."}


@dataclass
class SD3InitReport:
    """copied: UniAlignment tensor -> the SD3 tensor it was copied from (same name, or renamed);
    dropped: SD3 tensors not used (removed modules, or a shape that changed); initialized: UniAlignment
    tensors with no SD3 counterpart, left at their fresh initialisation."""

    copied: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)

    @property
    def renamed(self) -> dict[str, str]:
        return {ours: theirs for ours, theirs in self.copied.items() if ours != theirs}

    def summary(self) -> str:
        lines = [
            f"copied {len(self.copied)} tensors from SD3 ({len(self.renamed)} renamed: "
            + ", ".join(f"{theirs} -> {ours}" for ours, theirs in self.renamed.items())
            + ")",
            f"dropped {len(self.dropped)} SD3 tensors: " + ", ".join(self.dropped),
            f"initialised {len(self.initialized)} new tensors: " + ", ".join(self.initialized),
        ]
        return "\n".join(lines)


def _ours(sd3_name: str) -> str:
    for sd3_prefix, our_prefix in SD3_RENAMED_PREFIXES.items():
        if sd3_name.startswith(sd3_prefix):
            return our_prefix + sd3_name[len(sd3_prefix) :]
    return sd3_name


def plan_sd3_transfer(
    our_shapes: Mapping[str, tuple[int, ...]], sd3_shapes: Mapping[str, tuple[int, ...]]
) -> SD3InitReport:
    """Decide, from names and shapes alone, what is copied, dropped and initialised."""
    report = SD3InitReport()
    for sd3_name, sd3_shape in sd3_shapes.items():
        our_name = _ours(sd3_name)
        if our_name in our_shapes and tuple(our_shapes[our_name]) == tuple(sd3_shape):
            report.copied[our_name] = sd3_name
        else:
            report.dropped.append(sd3_name)
    report.initialized = [name for name in our_shapes if name not in report.copied]
    return report


def load_sd3_state_dict(model: UniAlignmentTransformer, sd3_state_dict: Mapping[str, torch.Tensor]) -> SD3InitReport:
    """Copy an SD3 transformer's tensors into `model` in place; returns the report."""
    our_state = model.state_dict()
    report = plan_sd3_transfer(
        {name: tuple(t.shape) for name, t in our_state.items()},
        {name: tuple(t.shape) for name, t in sd3_state_dict.items()},
    )
    model.load_state_dict({ours: sd3_state_dict[theirs] for ours, theirs in report.copied.items()}, strict=False)
    return report


def init_from_sd3(
    sd3_path: str | os.PathLike,
    vocab_size: int,
    subfolder: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> tuple[UniAlignmentTransformer, SD3InitReport]:
    """Build the UniAlignment transformer from a diffusers `SD3Transformer2DModel` folder.

    Args:
        sd3_path: the transformer folder, or a pipeline folder with `subfolder="transformer"`.
        vocab_size: the text head's size, len(T5 tokenizer) (32100 for SD3's tokenizer).
        config_overrides: UniAlignment-only fields such as `teacher_dim` or `align_depth`.
    """
    sd3 = SD3Transformer2DModel.from_pretrained(sd3_path, subfolder=subfolder, torch_dtype=torch_dtype)
    our_fields = inspect.signature(UniAlignmentTransformer.__init__).parameters
    config = {key: value for key, value in sd3.config.items() if key in our_fields}
    config.update(vocab_size=vocab_size, **config_overrides)
    model = UniAlignmentTransformer.from_config(config)
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    report = load_sd3_state_dict(model, sd3.state_dict())
    return model, report
