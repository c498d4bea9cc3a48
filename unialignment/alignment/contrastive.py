"""Cross-modal semantic alignment: a symmetric InfoNCE loss between the image and text streams.

The CLIP objective (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") applied inside UniAlignment (Song et al. 2025, docs/METHOD.md section 5): the pooled, normalised
final image states of the image-stream pass against the pooled, normalised final text states of the
text-stream pass, with the other samples of the batch as negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def pool_tokens(hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens: (B, N, D) -> (B, D); `token_mask` (B, N) keeps only the marked tokens."""
    if token_mask is None:
        return hidden_states.mean(dim=1)
    weights = token_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    temperature: float = 0.07,
    gather_across_ranks: bool = False,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """(CE(logits, diag) + CE(logits^T, diag)) / 2 with logits = f_img f_txt^T / temperature.

    image_features, text_features: (B, D) pooled features of matching samples, row i with row i.
    Reference negatives are the local micro-batch. With `gather_across_ranks` (beyond the reference)
    every rank's features are gathered, with gradients, and the local rows are scored against all of
    them; the mean of the ranks' losses then equals the loss of the whole global batch. All ranks must
    hold the same micro-batch size. `positives` (B, B), symmetric with rows summing to 1, replaces the
    diagonal target where several rows of a batch match each other (a caption repeated, say); local only.
    """
    if positives is not None and gather_across_ranks:
        raise ValueError(
            "contrastive_loss: positives are local to the batch; they cannot be used with gather_across_ranks."
        )
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    labels = torch.arange(image_features.shape[0], device=image_features.device) if positives is None else positives
    all_image_features, all_text_features = image_features, text_features
    if gather_across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        all_image_features = torch.cat(all_gather(image_features), dim=0)
        all_text_features = torch.cat(all_gather(text_features), dim=0)
        labels = labels + dist.get_rank() * image_features.shape[0]
    logits_per_image = image_features @ all_text_features.T / temperature
    logits_per_text = text_features @ all_image_features.T / temperature
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
