"""The frozen VAE: scaling constants come from the config, scale/unscale invert, images round-trip as pixels."""

import pytest
import torch
from PIL import Image

from unialignment.frozen.vae import FrozenVAE, pil_to_pixels, pixels_to_pil
from unialignment.toy.vae import make_tiny_vae


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return FrozenVAE.from_pretrained(make_tiny_vae(tmp_path_factory.mktemp("vae")))


def test_scaling_is_read_from_the_config(vae):
    assert (vae.scaling_factor, vae.shift_factor) == (1.5305, 0.0609)
    raw = torch.tensor([0.0609, 1.0609])
    torch.testing.assert_close(vae.scale(raw), torch.tensor([0.0, 1.5305]))
    torch.testing.assert_close(vae.unscale(vae.scale(raw)), raw)


def test_encode_decode_shapes_and_frozen_weights(vae):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = vae.encode(pixels, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8) and vae.downsample_factor == 4
    assert vae.decode(latents).shape == (2, 3, 32, 32)
    assert not any(p.requires_grad for p in vae.vae.parameters())
    mean, std = vae.latent_distribution(pixels)
    torch.testing.assert_close(vae.sample_latents(mean, torch.zeros_like(std)), vae.scale(mean))


def test_pixel_conversion_round_trip():
    image = Image.new("RGB", (4, 2), (255, 0, 128))
    pixels = pil_to_pixels([image])
    assert pixels.shape == (1, 3, 2, 4)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    assert pixels_to_pil(pixels)[0].tobytes() == image.tobytes()


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FrozenVAE.from_pretrained(tmp_path / "nowhere")
