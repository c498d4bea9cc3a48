"""Inference: the UniAlignment diffusers pipeline."""

from unialignment.pipelines.pipeline_unialignment import (
    UniAlignmentImageOutput,
    UniAlignmentPipeline,
    UniAlignmentTextOutput,
)
from unialignment.pipelines.utils import image_grid

__all__ = ["UniAlignmentImageOutput", "UniAlignmentPipeline", "UniAlignmentTextOutput", "image_grid"]
