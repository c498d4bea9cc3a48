"""A tiny real AutoencoderKL with SD3's latent scaling constants, saved with `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

# SD3's VAE shape in miniature: 4x downsampling (3 blocks), 4 latent channels, no quant convs, and
# SD3's own scaling and shift so the scaling code path is the real one.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)


def make_tiny_vae(folder: Path, seed: int = 0, **overrides) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**{**TINY_VAE_CONFIG, **overrides})
    vae.save_pretrained(folder)
    return folder
