"""A deterministic checker for the shapes world: objects read back out of pixels, attributes out of words.

Pixels: every pixel takes the nearest of the world's colours or the background (in RGB, within
`MAX_COLOUR_DISTANCE`); each colour with enough pixels is one object. Its shape comes from how its pixels
split between the top and bottom halves of its bounding box (a triangle is bottom-heavy) and how much of the
box it fills (square about 1, circle pi/4), its position from its centroid, its size from its extent.
Words: a text names the colours, shapes and positions whose words it contains.

No model is involved, so the scores of the demo's table mean the same on every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from unialignment.toy.world import BACKGROUND, COLOURS, PHRASES, POSITIONS, SHAPES, SIZES, ShapeObject

# Half-way between the closest two palette colours is about 75; beyond 90 a pixel is noise, not an object.
MAX_COLOUR_DISTANCE = 90.0
# An object's eroded core covers at least this fraction of the image: a quarter of the smallest (small triangle)
# drawing, whose core is about half of it at 64 px.
MIN_OBJECT_FRACTION = 0.25 * 0.5 * (2 * SIZES["small"]) ** 2
# An upright triangle holds 1/4 of its area above its half height and 3/4 below (ratio 1/3); squares and circles
# are symmetric (ratio 1). Squares fill their bounding box, circles pi/4 of it. The cut points lie half-way.
TRIANGLE_TOP_TO_BOTTOM = 0.65
SQUARE_FILL = 0.89


@dataclass(frozen=True)
class FoundObject:
    colour: str
    shape: str
    position: str
    size: str
    pixels: int

    def matches(self, obj: ShapeObject, attributes: tuple[str, ...] = ("colour", "shape", "position")) -> bool:
        return all(getattr(self, name) == getattr(obj, name) for name in attributes)


def find_objects(image: Image.Image) -> list[FoundObject]:
    """The objects in `image`, largest first."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    palette_names = ["background", *COLOURS]
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
    distances = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = distances.argmin(axis=-1)
    nearest[distances.min(axis=-1) > MAX_COLOUR_DISTANCE] = -1

    found = []
    for index, colour in enumerate(palette_names[1:], start=1):
        mask = nearest == index
        # A decoder's soft edges leave thin halos of in-between colours (red on yellow reads as orange); an object
        # must have a solid core that survives a 3x3 erosion.
        if _eroded(mask).sum() < MIN_OBJECT_FRACTION * height * width:
            continue
        ys, xs = np.nonzero(mask)
        # the box spans the columns and rows holding at least two of its pixels, so stray pixels do not stretch it
        x0, x1 = _span(np.bincount(xs, minlength=width))
        y0, y1 = _span(np.bincount(ys, minlength=height))
        fill = len(xs) / ((x1 - x0 + 1) * (y1 - y0 + 1))
        middle_row = (y0 + y1) / 2
        top_to_bottom = (ys < middle_row).sum() / max((ys > middle_row).sum(), 1)
        if top_to_bottom < TRIANGLE_TOP_TO_BOTTOM:
            shape = "triangle"
        else:
            shape = "square" if fill > SQUARE_FILL else "circle"
        centre = (xs.mean() / width, ys.mean() / height)
        position = min(POSITIONS, key=lambda name: _distance(POSITIONS[name], centre))
        half_extent = max(x1 - x0 + 1, y1 - y0 + 1) / 2 / max(width, height)
        size = min(SIZES, key=lambda name: abs(SIZES[name] - half_extent))
        found.append(FoundObject(colour, shape, position, size, len(xs)))
    return sorted(found, key=lambda obj: -obj.pixels)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood lies wholly inside `mask`."""
    padded = np.pad(mask, 1)
    core = np.ones_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            core &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return core


def _span(counts: np.ndarray) -> tuple[int, int]:
    dense = np.nonzero(counts >= 2)[0]
    if len(dense) == 0:
        dense = np.nonzero(counts)[0]
    return int(dense[0]), int(dense[-1])


def _distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def colours_in(text: str) -> set[str]:
    return {word for word in _words(text) if word in COLOURS}


def shapes_in(text: str) -> set[str]:
    # plural forms count too ("two squares")
    return {word.removesuffix("s") for word in _words(text) if word.removesuffix("s") in SHAPES}


def positions_in(text: str) -> set[str]:
    lowered = " ".join(_words(text))
    return {name for name, phrase in PHRASES.items() if phrase in lowered}


def mask_iou(predicted: Image.Image, target: Image.Image) -> float:
    """Intersection over union of the bright pixels of two mask (or edge) images."""
    a = np.asarray(predicted.convert("L").resize(target.size)) > 127
    b = np.asarray(target.convert("L")) > 127
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
