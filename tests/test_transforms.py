"""Image transforms: exact output geometry, centre crops, RGB conversion, pixel range, aspect-ratio buckets."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from unialignment.data.transforms import (
    bucket_for_size,
    make_buckets,
    nearest_bucket,
    prepare_images,
    resize_and_center_crop,
    to_pixels,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def dot_image(width: int, height: int, dots: dict[tuple[int, int], tuple[int, int, int]]) -> Image.Image:
    """White image with a filled circle of radius 5 at each (x, y) in `dots`, in that colour."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for (x, y), colour in dots.items():
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
    return image


def has_colour(image: Image.Image, colour: tuple[int, int, int]) -> bool:
    """Any pixel clearly of this pure colour (its channel high, the other two low), bicubic blur allowed."""
    pixels = np.asarray(image).astype(int)
    channel = colour.index(255)
    others = [c for c in range(3) if c != channel]
    return bool(((pixels[..., channel] > 150) & (pixels[..., others] < 100).all(-1)).any())


@pytest.mark.parametrize("input_size", [(640, 480), (480, 640), (300, 300), (100, 50), (2000, 37)])
@pytest.mark.parametrize("output_size", [(512, 512), (368, 720), (720, 368)])
def test_output_has_exact_size(input_size, output_size):
    height, width = output_size
    cropped = resize_and_center_crop(noise_image(*input_size), height, width)
    assert cropped.size == (width, height)
    assert cropped.mode == "RGB"
    target_pixels, _ = prepare_images(noise_image(*input_size), [], height, width)
    assert target_pixels.shape == (3, height, width)


@pytest.mark.parametrize("landscape", [True, False])
def test_center_crop_keeps_the_centre_and_cuts_the_long_side_edges(landscape):
    long_side, short_side = 400, 200
    if landscape:  # dot near the left edge of the long (horizontal) side
        image = dot_image(long_side, short_side, {(200, 100): RED, (12, 100): BLUE})
    else:  # dot near the bottom edge of the long (vertical) side
        image = dot_image(short_side, long_side, {(100, 200): RED, (100, long_side - 12): BLUE})
    cropped = resize_and_center_crop(image, 256, 256)
    assert cropped.getpixel((128, 128)) == RED
    assert not has_colour(cropped, BLUE)
    assert has_colour(image, BLUE)  # the check itself sees the dot before cropping


def test_whole_short_side_is_kept():
    """The short side is resized, not cropped: dots near its edges survive."""
    image = dot_image(400, 200, {(200, 8): RED, (200, 192): BLUE})
    cropped = resize_and_center_crop(image, 256, 256)
    assert has_colour(cropped, RED) and has_colour(cropped, BLUE)


def test_rgba_palette_grey_and_cmyk_become_rgb():
    transparent = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    opaque_red = Image.new("RGBA", (64, 48), (255, 0, 0, 255))
    palette = Image.new("RGB", (64, 48), (0, 255, 0)).convert("P")
    grey = Image.new("L", (64, 48), 128)
    cmyk = Image.new("CMYK", (64, 48), (0, 0, 0, 0))
    # A palette PNG whose colour 0 is transparent, as PIL loads it (transparency in `info`).
    transparent_palette = Image.new("P", (64, 48), 0)
    transparent_palette.putpalette([255, 0, 0, 0, 0, 255])
    buffer = io.BytesIO()
    transparent_palette.save(buffer, format="PNG", transparency=0)
    transparent_palette = Image.open(buffer)
    assert transparent_palette.mode == "P" and "transparency" in transparent_palette.info

    # Transparency composites onto white, not black.
    assert torch.equal(to_pixels(resize_and_center_crop(transparent, 32, 32)), torch.ones(3, 32, 32))
    assert torch.equal(to_pixels(resize_and_center_crop(transparent_palette, 32, 32)), torch.ones(3, 32, 32))
    assert np.asarray(resize_and_center_crop(opaque_red, 32, 32)).reshape(-1, 3).tolist() == [[255, 0, 0]] * 1024
    assert resize_and_center_crop(palette, 32, 32).getpixel((5, 5)) == (0, 255, 0)
    assert resize_and_center_crop(grey, 32, 32).getpixel((5, 5)) == (128, 128, 128)
    assert resize_and_center_crop(cmyk, 32, 32).getpixel((5, 5)) == (255, 255, 255)
    for image in (transparent, palette, grey, cmyk):
        assert to_pixels(image).shape == (3, 48, 64)


def test_pixels_map_0_to_minus_1_and_255_to_1():
    image = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255], [0, 128, 255]]], dtype=np.uint8))
    pixels = to_pixels(image)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 1, 3)
    assert pixels[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert pixels[:, 0, 1].tolist() == [1.0, 1.0, 1.0]
    assert pixels[:, 0, 2].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    black, white = Image.new("RGB", (300, 200), "black"), Image.new("RGB", (300, 200), "white")
    black_pixels, [white_pixels] = prepare_images(black, [white], 256, 256)
    assert (black_pixels == -1).all() and (white_pixels == 1).all()


def test_source_and_target_of_the_same_size_get_identical_crops():
    image = noise_image(300, 200)
    target_pixels, source_pixels = prepare_images(image, [image, image.copy()], 368, 720)
    assert len(source_pixels) == 2
    assert all(torch.equal(target_pixels, pixels) for pixels in source_pixels)


def test_sources_of_other_sizes_get_the_target_geometry():
    target_pixels, source_pixels = prepare_images(noise_image(640, 480), [noise_image(100, 300)], 256, 256)
    assert target_pixels.shape == source_pixels[0].shape == (3, 256, 256)


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_buckets(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert len(set(buckets)) == len(buckets) >= 5
    for height, width in buckets:
        assert height % 16 == 0 and width % 16 == 0
        assert abs(height * width / resolution**2 - 1) < 0.1
    ratios = [width / height for height, width in buckets]
    assert ratios == sorted(ratios)
    assert math.isclose(ratios[0], 0.5, rel_tol=0.1) and math.isclose(ratios[-1], 2.0, rel_tol=0.1)
    # Ratio r and 1 / r are transposes of each other.
    assert sorted((width, height) for height, width in buckets) == sorted(buckets)


def test_nearest_bucket():
    buckets = make_buckets(512)
    widest = max(buckets, key=lambda bucket: bucket[1] / bucket[0])
    assert nearest_bucket(1024, 512, buckets) == widest
    assert nearest_bucket(512, 1024, buckets) == widest[::-1]
    assert nearest_bucket(700, 700, buckets) == (512, 512)
    assert nearest_bucket(5000, 100, buckets) == widest  # beyond the range: the most extreme bucket
    # A 2:1 image lies exactly between ratios 1 and 4 in log space: the square wins the tie.
    square, four_to_one = (512, 512), (256, 1024)
    assert nearest_bucket(1024, 512, [four_to_one, square]) == square


def test_buckets_off_means_the_square():
    assert bucket_for_size(1024, 512, 512) == (512, 512)
    assert bucket_for_size(1024, 512, 512, make_buckets(512)) != (512, 512)


def test_bad_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(500)
    with pytest.raises(ValueError, match="multiple of 16"):
        prepare_images(noise_image(64, 64), [], 500, 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_for_size(64, 64, 500)
