"""Networks: the UniAlignment transformer and its initialisation from SD3."""

from unialignment.models.transformer import UniAlignmentTransformer, UniAlignmentTransformerOutput

__all__ = ["UniAlignmentTransformer", "UniAlignmentTransformerOutput"]
