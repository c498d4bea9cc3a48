"""Image geometry for training: resize, centre-crop and scale to [-1, 1], optionally by aspect-ratio bucket.

Every image becomes an RGB tensor (3, H, W) in [-1, 1], the range the VAE encodes. The reference resizes the
shorter side to the resolution and centre-crops a square; `resize_and_center_crop` generalises that to any
(height, width) so that the same rule also serves aspect-ratio buckets (*beyond* the reference, off by
default: with buckets off every sample is (resolution, resolution)).

All images of one sample (target and condition sources) get the same output geometry, so an edit source and
its target of the same size stay pixel-aligned, which the editing and perception tasks rely on.

Heights and widths are multiples of the VAE's downsampling times the transformer's patch size (16 for SD3: 8 x 2),
so that latents tile into whole patches. Callers that hold the components pass their own multiple; the default is
SD3's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SD3_SIZE_MULTIPLE = 16  # SD3's VAE downsampling 8 x transformer patch size 2

# Errors PIL raises for unreadable, truncated or hostile image files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def size_multiple(vae_downsampling: int, patch_size: int) -> int:
    """What image sides must be multiples of: the VAE's downsampling times the transformer's patch size."""
    return vae_downsampling * patch_size


def check_size(height: int, width: int, multiple: int = SD3_SIZE_MULTIPLE) -> None:
    """Raise a ValueError unless both sides are positive multiples of `multiple`."""
    for name, side in (("height", height), ("width", width)):
        if side <= 0 or side % multiple != 0:
            raise ValueError(
                f"Image {name} {side} is not a positive multiple of {multiple} "
                f"(the VAE's downsampling x the transformer's patch size); pick a multiple of {multiple}."
            )


def load_image(path: str | Path, cover: tuple[int, int] | None = None) -> Image.Image:
    """Open, fully decode (PIL decodes lazily, so a truncated file fails here) and convert to RGB with `to_rgb`.
    Raises one of IMAGE_ERRORS when the file cannot be read.

    `cover` (height, width): the image will be resized to cover that size (`resize_and_center_crop`); a JPEG at
    least twice as large is then decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode, in the DCT domain), still
    covering it, which is several times faster than decoding every pixel and resizing them away. The pixels differ
    slightly from a full decode, so it is a switch (`data.draft_decode`)."""
    with Image.open(path) as image:
        if cover is not None and image.format == "JPEG":
            scale = max(cover[0] / image.height, cover[1] / image.width)
            if scale <= 0.5:
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image.load()
        rgb = to_rgb(image)
        return rgb if rgb is not image else image.copy()  # closing the file releases the image it returned


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto white, not left black."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale `image` (bicubic) until it covers (height, width), then centre-crop to exactly that size.

    The side that needs the larger scale matches the target exactly, so nothing is padded or stretched; for a
    square target this is "shorter side resized to the resolution, centre crop". Returns an RGB image.
    """
    image = to_rgb(image)
    scale = max(height / image.height, width / image.width)
    # max(...) guards against rounding a covering side one pixel short.
    resized_width = max(width, round(image.width * scale))
    resized_height = max(height, round(image.height * scale))
    if (resized_width, resized_height) != image.size:
        image = image.resize((resized_width, resized_height), Image.Resampling.BICUBIC)
    left = (resized_width - width) // 2
    top = (resized_height - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) with 0 -> -1 and 255 -> 1."""
    pixels = np.asarray(to_rgb(image), dtype=np.float32)  # (H, W, 3) in [0, 255]
    pixels = pixels / 127.5 - 1.0
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def to_uint8_pixels(image: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor (3, H, W): a quarter of `to_pixels`' bytes to move; the VAE scales it to [-1, 1]
    on its device (`unialignment.frozen.vae.uint8_to_pixels`, equal to `to_pixels` number for number)."""
    return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).transpose(2, 0, 1).copy())


def prepare_images(
    target: Image.Image,
    sources: list[Image.Image],
    height: int,
    width: int,
    multiple: int = SD3_SIZE_MULTIPLE,
    uint8: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Resize-crop the target and every source to the same (height, width) and scale to [-1, 1] (`uint8`: keep
    [0, 255] as uint8, see `to_uint8_pixels`).

    Returns target pixels (3, height, width) and one (3, height, width) tensor per source.
    """
    check_size(height, width, multiple)
    convert = to_uint8_pixels if uint8 else to_pixels
    target_pixels = convert(resize_and_center_crop(target, height, width))
    source_pixels = [convert(resize_and_center_crop(source, height, width)) for source in sources]
    return target_pixels, source_pixels


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def make_buckets(
    resolution: int,
    patch_multiple: int = SD3_SIZE_MULTIPLE,
    min_ratio: float = 0.5,
    max_ratio: float = 2.0,
    step: float = 0.25,
) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution**2 pixels, sorted by aspect ratio width / height.

    Aspect ratios are spaced evenly in log2 from `min_ratio` to `max_ratio`, at most `step` apart (0.25: nine
    buckets for [0.5, 2]), anchored at 1 so that (resolution, resolution) is always a bucket. The shorter side
    is rounded to a multiple of `patch_multiple` first and the longer side then restores the pixel count,
    which keeps the area within a few percent and makes ratio r and 1 / r transposes of each other.
    """
    if resolution % patch_multiple != 0:
        raise ValueError(
            f"resolution {resolution} is not a multiple of {patch_multiple} (the VAE's downsampling x the "
            "transformer's patch size)."
        )
    if not 0 < min_ratio <= 1 <= max_ratio:
        raise ValueError(f"need 0 < min_ratio <= 1 <= max_ratio, got min_ratio={min_ratio}, max_ratio={max_ratio}.")
    if step <= 0:
        raise ValueError(f"step (in log2 aspect ratio) must be positive, got {step}.")

    log_ratios = {0.0}
    for end in (math.log2(min_ratio), math.log2(max_ratio)):
        num_steps = math.ceil(abs(end) / step)
        log_ratios.update(end * k / num_steps for k in range(1, num_steps + 1))

    buckets = set()
    for log_ratio in log_ratios:
        elongation = 2 ** abs(log_ratio)  # long side / short side
        short_side = _round_to_multiple(resolution / math.sqrt(elongation), patch_multiple)
        long_side = _round_to_multiple(resolution * resolution / short_side, patch_multiple)
        buckets.add((short_side, long_side) if log_ratio >= 0 else (long_side, short_side))
    return sorted(buckets, key=lambda bucket: bucket[1] / bucket[0])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket closest to the image's aspect ratio in log space; ties go to the squarer one."""
    log_ratio = math.log(width / height)

    def distance(bucket: tuple[int, int]) -> tuple[float, float]:
        bucket_log_ratio = math.log(bucket[1] / bucket[0])
        # Rounded so that float noise does not break a true tie, which then goes to the squarer bucket.
        return round(abs(bucket_log_ratio - log_ratio), 9), abs(bucket_log_ratio)

    return min(buckets, key=distance)


def bucket_for_size(
    width: int,
    height: int,
    resolution: int,
    buckets: list[tuple[int, int]] | None = None,
    multiple: int = SD3_SIZE_MULTIPLE,
) -> tuple[int, int]:
    """Output (height, width) for an image of this size: the nearest bucket, or the square with buckets off."""
    if buckets is None:
        check_size(resolution, resolution, multiple)
        return resolution, resolution
    return nearest_bucket(width, height, buckets)
