"""A tiny real AutoencoderKL with SD3's latent scaling constants, saved with `save_pretrained`, and a short
trainer that teaches it to reconstruct a dataset's images (Kingma & Welling 2014; the KL weight is tiny, as in
the Stable Diffusion autoencoders of Rombach et al. 2022, so the latents stay close to deterministic)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tqdm.auto import tqdm

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


@dataclass
class VAETrainingReport:
    steps: int
    psnr: float  # dB, of the posterior-mean reconstruction of the checked images
    scaling_factor: float
    shift_factor: float


def images_to_tensor(images: Sequence[Image.Image], side: int) -> torch.Tensor:
    """PIL images -> (N, 3, side, side) in [-1, 1], each resized to side x side."""
    arrays = [np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def reconstruction_psnr(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 64) -> float:
    """PSNR in dB of decode(posterior mean) against `pixels` (values in [-1, 1], so the peak-to-peak is 2)."""
    squared_error, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size]
            decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
            squared_error += float(((decoded - batch) ** 2).sum())
            count += batch.numel()
    return 10 * math.log10(4.0 / max(squared_error / count, 1e-12))


def train_vae(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    max_steps: int = 2000,
    target_psnr: float = 31.0,
    batch_size: int = 8,
    lr: float = 1.5e-3,
    kl_weight: float = 1e-9,
    check_every: int = 250,
    check_images: int = 256,
    seed: int = 0,
) -> VAETrainingReport:
    """Train `vae` in place on `pixels` (N, 3, H, W) in [-1, 1] until its reconstructions reach `target_psnr` (dB),
    measured every `check_every` steps on `check_images` evenly spaced images, or `max_steps` pass. Then set its
    latent scaling so that scaled latents have mean 0 and standard deviation 1 over those images (the statistics
    SD's and SD3's constants were chosen from). Returns what it reached."""
    generator = torch.Generator().manual_seed(seed)
    # Channels-last convolutions and a foreach AdamW: measured on 2 CPU cores, a step at batch 8 and 64 px takes
    # about 20% less time (the optimizer's per-tensor loop was an eighth of it); same maths.
    vae.to(memory_format=torch.channels_last)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    check = pixels[:: max(1, len(pixels) // check_images)]
    # Start the posterior nearly deterministic (log-variance -8, std 0.02): with unit variance at initialisation
    # most of a short training goes into learning to ignore the sampling noise. The KL weight is per element of
    # a mean squared error, so 1e-9 here is of the order of SD's 1e-6 on a summed error.
    log_variance = vae.encoder.conv_out.bias[vae.config.latent_channels :]
    with torch.no_grad():
        log_variance.fill_(-8.0)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, foreach=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    vae.train()
    psnr, step = float("-inf"), 0
    progress = tqdm(range(max_steps), desc="vae", leave=False)
    for step in progress:
        batch = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        decoded = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(decoded, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % check_every == 0 or step + 1 == max_steps:
            vae.eval()
            psnr = reconstruction_psnr(vae, check)
            vae.train()
            progress.set_postfix(psnr=f"{psnr:.1f}")
            if psnr >= target_psnr:
                break
    vae.eval()
    vae.to(memory_format=torch.contiguous_format)  # saved and used as ordinary tensors

    with torch.no_grad():
        means = torch.cat([vae.encode(check[i : i + 64]).latent_dist.mean for i in range(0, len(check), 64)])
    shift, scale = float(means.mean()), float(1.0 / means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return VAETrainingReport(steps=step + 1, psnr=psnr, scaling_factor=scale, shift_factor=shift)
