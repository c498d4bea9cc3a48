"""Intrinsic-modal semantic alignment: the alignment heads' outputs pulled toward a frozen teacher.

Representation alignment as in REPA (Yu et al. 2024, "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think"), applied by UniAlignment (docs/METHOD.md section 5) to
both streams: the block-`align_depth` image states toward the teacher's image features and the text
states toward the teacher's text embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_alignment_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch mean of 1 - cos(predicted, target); both (B, D_teacher). The target carries no gradient."""
    if predicted.shape != target.shape:
        raise ValueError(
            f"alignment head output {tuple(predicted.shape)} and teacher target {tuple(target.shape)} differ."
        )
    return (1.0 - F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1)).mean()
