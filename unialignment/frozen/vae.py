"""The frozen VAE: images <-> the latents both streams see (docs/METHOD.md section 2).

Stable Diffusion 3's 16-channel AutoencoderKL (Esser et al. 2024). The transformer works on
latent = (z - shift_factor) * scaling_factor; both constants are read from `vae.config`, never
repeated in code. Decoding inverts the scaling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from unialignment.frozen.random_weights import build_with_random_weights


def downsample_factor(vae_config) -> int:
    """Spatial downsampling of an AutoencoderKL: 8 for SD3's four-level encoder."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def scale_latents(raw_latents: torch.Tensor, vae_config) -> torch.Tensor:
    """z -> (z - shift) * scale: the latents the transformer sees. SD1/2-style VAEs have no shift; SD3's is 0.0609."""
    return (raw_latents - float(vae_config.shift_factor or 0.0)) * float(vae_config.scaling_factor)


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of `scale_latents`: what the VAE decoder takes."""
    return latents / float(vae_config.scaling_factor) + float(vae_config.shift_factor or 0.0)


# A plain class, not an nn.Module, for the same reason as FrozenT5: a frozen component must stay out of
# the trainer's parameters, state dict and distributed wrapper.
class FrozenVAE:
    """AutoencoderKL in eval mode without gradients, with the latent scaling of its config."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae.eval().requires_grad_(False)
        self.downsample_factor = downsample_factor(vae.config)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        random_weights: bool = False,
    ) -> FrozenVAE:
        """`random_weights`: the folder holds only config.json; the weights are drawn at random on `device`."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder not found or without config.json: {path}")
        if random_weights:
            config = AutoencoderKL.load_config(path)
            build = lambda: AutoencoderKL.from_config(config)  # noqa: E731
            return cls(build_with_random_weights(build, device, torch_dtype, seed=1, cast_buffers=True))
        return cls(AutoencoderKL.from_pretrained(path, torch_dtype=torch_dtype).to(device))

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (B, 3, H, W) in [-1, 1], or uint8 in [0, 255] (scaled on the VAE's device, `uint8_to_pixels`) ->
        the posterior's (mean, std), each (B, C, H/f, W/f), unscaled.

        Kept separate from sampling so that an offline cache can store the distribution and draw a fresh
        latent every epoch, as encoding online does.
        """
        pixels = pixels.to(self.device, non_blocking=True)  # asynchronous from pinned memory
        if pixels.dtype == torch.uint8:
            pixels = uint8_to_pixels(pixels)
        posterior = self.vae.encode(pixels.to(self.dtype)).latent_dist
        return posterior.mean, posterior.std

    def scale(self, raw_latents: torch.Tensor) -> torch.Tensor:
        """z -> (z - shift) * scale: the latents the transformer sees."""
        return scale_latents(raw_latents, self.vae.config)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        return unscale_latents(latents, self.vae.config)

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw z ~ N(mean, std^2) and scale it. With std = 0 this is the posterior mean."""
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale(mean + std * noise)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), sampled from the posterior."""
        mean, std = self.latent_distribution(pixels)
        return self.sample_latents(mean, std, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels (B, 3, H, W) in [-1, 1], clamped."""
        pixels = self.vae.decode(self.unscale(latents).to(self.device, self.dtype)).sample
        return pixels.clamp(-1.0, 1.0)


def pil_to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB images of one size -> (B, 3, H, W) float32 in [-1, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def uint8_to_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] with 0 -> -1 and 255 -> 1: the range the VAE encodes. The same float32
    operations as `unialignment.data.transforms.to_pixels`, so the two give equal numbers."""
    return pixels.float() / 127.5 - 1.0


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1], or uint8 in [0, 255], -> RGB images."""
    if pixels.dtype != torch.uint8:
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]
