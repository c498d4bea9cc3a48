"""Coloured shapes on plain backgrounds with captions that state them: the smallest world in which a
text-to-image model, a captioner and their alignment can be seen to learn."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7), "middle": (0.5, 0.5)}


@dataclass(frozen=True)
class ShapeScene:
    colour: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        where = "in the middle" if self.position == "middle" else f"at the {self.position}"
        if self.position in ("left", "right"):
            where = f"on the {self.position}"
        return f"a {self.colour} {self.shape} {where}"


def all_scenes() -> list[ShapeScene]:
    return [ShapeScene(*combo) for combo in itertools.product(COLOURS, SHAPES, POSITIONS)]


def draw_scene(scene: ShapeScene, size: int = 32, background=(245, 245, 245)) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = (coordinate * size for coordinate in POSITIONS[scene.position])
    radius = size * 0.18
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    colour = COLOURS[scene.colour]
    if scene.shape == "square":
        draw.rectangle(box, fill=colour)
    elif scene.shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image
