"""From a raw batch to the objective's `TrainingBatch`: what the frozen components compute.

Per sample, the frozen components give: the VAE posterior (mean, std) of the target and of each condition
image, the T5 states of the image stream's prompt, and the teacher's image and text targets. These are computed
online, or read from the offline feature cache (`unialignment.data.feature_cache`), which stores exactly these
tensors; either way the latents are then drawn from the posterior with the run's generator, so both paths give
the same batches for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unialignment.data.collate import RawBatch
from unialignment.frozen.teacher import AlignmentTeacher
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.frozen.vae import FrozenVAE, pixels_to_pil
from unialignment.training.objective import TrainingBatch


@dataclass
class FrozenComponents:
    """The frozen models of a run; `teacher` None switches the representation-alignment targets off."""

    t5: FrozenT5
    vae: FrozenVAE
    teacher: AlignmentTeacher | None = None


@torch.no_grad()
def compute_features(batch: RawBatch, components: FrozenComponents) -> dict[str, torch.Tensor]:
    """Every frozen-component output of a batch, on the components' devices: `target_mean` / `target_std` and
    `source_{k}_mean` / `source_{k}_std` (VAE posteriors, unscaled), `prompt_embeds` (T5), and with a teacher
    `teacher_image` / `teacher_text`."""
    vae, t5 = components.vae, components.t5
    features = {}
    features["target_mean"], features["target_std"] = vae.latent_distribution(batch.target_pixels)
    for slot, pixels in enumerate(batch.source_pixels):
        features[f"source_{slot}_mean"], features[f"source_{slot}_std"] = vae.latent_distribution(pixels)
    features["prompt_embeds"] = t5.encode_ids(batch.prompt_ids.to(t5.device))
    if components.teacher is not None:
        # The teacher sees the image whose caption the text stream models: the (edited) target.
        features["teacher_image"] = components.teacher.image_targets(pixels_to_pil(batch.target_pixels))
        features["teacher_text"] = components.teacher.text_targets(batch.captions)
    return features


def to_training_batch(
    batch: RawBatch,
    features: dict[str, torch.Tensor],
    vae: FrozenVAE,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> TrainingBatch:
    """Draw the latents from the posteriors (target first, then each condition slot) and assemble the batch."""

    def latents(name: str) -> torch.Tensor:
        mean, std = features[f"{name}_mean"].float().cpu(), features[f"{name}_std"].float().cpu()
        # Drawn on the CPU with the run's generator, so GPU and CPU runs and cached and online features agree.
        return vae.sample_latents(mean, std, generator).to(device, dtype)

    teacher_image, teacher_text = features.get("teacher_image"), features.get("teacher_text")
    return TrainingBatch(
        target_latents=latents("target"),
        prompt_embeds=features["prompt_embeds"].to(device, dtype),
        caption_ids=batch.caption.input_ids.to(device),
        condition_latents=[latents(f"source_{slot}") for slot in range(batch.num_sources)] or None,
        caption_score_mask=batch.caption.score_mask.to(device),
        caption_attention_mask=batch.caption.attention_mask.to(device),
        teacher_image_targets=None if teacher_image is None else teacher_image.to(device, torch.float32),
        teacher_text_targets=None if teacher_text is None else teacher_text.to(device, torch.float32),
    )


def prepare_training_batch(
    batch: RawBatch,
    components: FrozenComponents,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> TrainingBatch:
    """Cached features when the batch carries them, else the frozen components online."""
    features = batch.features if batch.features is not None else compute_features(batch, components)
    return to_training_batch(batch, features, components.vae, generator, device, dtype)
