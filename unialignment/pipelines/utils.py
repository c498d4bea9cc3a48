"""Small helpers around the pipeline's outputs."""

from __future__ import annotations

import math

from PIL import Image


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste images row by row into one grid image; each cell is the size of the largest image."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    cell_width = max(image.width for image in images)
    cell_height = max(image.height for image in images)
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (column * cell_width, row * cell_height))
    return grid
