"""Tiny real transformers (UniAlignment and SD3) with the structure of the full-size ones."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

from unialignment.models import UniAlignmentTransformer

# SD3's fields at toy size: 3 blocks of 2 heads x 8 = 16 channels, 4 latent channels, T5 width 12.
TINY_SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=6,
    out_channels=4,
    pos_embed_max_size=16,
)
TINY_UNIALIGNMENT_CONFIG = dict(
    TINY_SD3_CONFIG, vocab_size=40, teacher_dim=10, alignment_hidden_dim=20, num_null_image_tokens=3, align_depth=2
)


def make_tiny_transformer(seed: int = 0, **overrides) -> UniAlignmentTransformer:
    torch.manual_seed(seed)
    return UniAlignmentTransformer(**{**TINY_UNIALIGNMENT_CONFIG, **overrides})


def make_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random SD3 transformer with `save_pretrained`, as stage 1 finds SD3-medium."""
    torch.manual_seed(seed)
    SD3Transformer2DModel(**TINY_SD3_CONFIG).save_pretrained(folder)
    return folder
