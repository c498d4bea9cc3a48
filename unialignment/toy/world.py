"""The shapes world: coloured shapes on a plain background, the built-in small default's data.

A scene holds one or two objects; each has a colour, a shape, a position and a size, and the scene's caption
states all four. Scenes are drawn at any side length (64 px by default) with a small seeded jitter, so that
images of one description differ. The same constants drive `unialignment.toy.checker`, which reads objects back
out of pixels, so generator and checker can never disagree about what "left" or "purple" means.

Held-out combinations: `heldout_triples()` picks colour-shape-position triples that the training split never
shows, in any image of any task, while every colour, shape and position (and every colour-shape pair) still
appears in training. A model that generates or describes them correctly has composed attributes it has only
seen apart.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter

# The debug world's palette and shapes (unialignment.toy.shapes), so both worlds speak one language.
from unialignment.toy.shapes import COLOURS, SHAPES

BACKGROUND = (245, 245, 245)
# Object centres as fractions of the side. Two-object scenes put their objects at opposite side positions
# (left and right, or top and bottom), half a side apart, so two large objects never overlap even when jittered;
# "middle" is used in one-object scenes only.
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "middle": (0.5, 0.5)}
SIDE_POSITIONS = ("left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# Half the object's extent, as a fraction of the side. Objects are large on purpose: a large one spans 40% of
# the side (26 px at 64 px, 6 latent pixels of the tiny VAE), so its shape survives the VAE and the colour of a
# few hundred pixels dominates the diffusion loss, which is what lets a CPU-sized model learn them in minutes.
SIZES = {"small": 0.14, "large": 0.2}
JITTER = 0.03  # the largest random shift of a centre, as a fraction of the side
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
PHRASES["middle"] = "in the middle"


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    position: str
    size: str = "large"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]

    @property
    def caption(self) -> str:
        return " and ".join(obj.phrase for obj in self.objects)

    @property
    def name(self) -> str:
        """A file-name stem that identifies the scene's description (not its jitter)."""
        return "__".join(f"{o.size}_{o.colour}_{o.shape}_{o.position}" for o in self.objects)

    def replace(self, index: int, **changes) -> Scene:
        objects = list(self.objects)
        fields = {**objects[index].__dict__, **changes}
        objects[index] = ShapeObject(**fields)
        return Scene(tuple(objects))


def all_objects() -> list[ShapeObject]:
    return [ShapeObject(*combo) for combo in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES)]


def heldout_triples() -> set[tuple[str, str, str]]:
    """Twelve colour-shape-position triples kept out of training: a diagonal through the 6 x 3 x 5 grid, so
    that each shape loses four of its thirty triples and each colour and position at most three."""
    colours, positions = list(COLOURS), list(POSITIONS)
    held = set()
    for c, colour in enumerate(colours):
        for s, shape in enumerate(SHAPES):
            for p, position in enumerate(positions):
                if (c + 2 * s + 3 * p) % 8 == 0:
                    held.add((colour, shape, position))
    return held


def is_heldout(scene: Scene, held: set[tuple[str, str, str]]) -> bool:
    return any(obj.triple in held for obj in scene.objects)


def object_box(obj: ShapeObject, side: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[float, ...]:
    fx, fy = POSITIONS[obj.position]
    cx, cy = (fx + offset[0]) * side, (fy + offset[1]) * side
    radius = SIZES[obj.size] * side
    return (cx - radius, cy - radius, cx + radius, cy + radius)


def draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, box: tuple[float, ...], fill) -> None:
    left, top, right, bottom = box
    if obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def jitter_offsets(scene: Scene, seed: int) -> list[tuple[float, float]]:
    """Per-object centre shifts drawn from `seed` (seed 0: none, the canonical picture)."""
    if seed == 0:
        return [(0.0, 0.0)] * len(scene.objects)
    rng = random.Random(seed)
    return [(rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)) for _ in scene.objects]


def draw_scene(scene: Scene, side: int = 64, seed: int = 0) -> Image.Image:
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj, offset in zip(scene.objects, jitter_offsets(scene, seed), strict=True):
        draw_object(draw, obj, object_box(obj, side, offset), COLOURS[obj.colour])
    return image


def draw_mask(scene: Scene, side: int = 64, seed: int = 0) -> Image.Image:
    """Perception target: the objects in white on black."""
    image = Image.new("RGB", (side, side), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj, offset in zip(scene.objects, jitter_offsets(scene, seed), strict=True):
        draw_object(draw, obj, object_box(obj, side, offset), (255, 255, 255))
    return image


def draw_edges(scene: Scene, side: int = 64, seed: int = 0) -> Image.Image:
    """Perception target: the objects' outlines in white on black (the mask minus its eroded interior)."""
    mask = draw_mask(scene, side, seed).convert("L")
    # A 5x5 minimum filter erodes the mask by two pixels; the outline is what erosion removes.
    interior = mask.filter(ImageFilter.MinFilter(5))
    return ImageChops.subtract(mask, interior).convert("RGB")
