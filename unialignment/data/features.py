"""From a raw batch to the objective's `TrainingBatch`: what the frozen components compute, online or cached.

Per sample, the frozen components give: the VAE posterior (mean, std) of the target and of each condition
image, the T5 states of the image stream's prompt, and the teacher's image and text targets. These are computed
online, or read from the offline feature cache (`unialignment.data.feature_cache`), which stores exactly these
tensors; either way the latents are then drawn from the posterior with the run's generator, so both paths give
the same batches for the same seed. `write_feature_cache` writes that cache (`scripts/cache_features.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file
from tqdm import tqdm

from unialignment.data.collate import Collator, RawBatch
from unialignment.data.dataset import TaskGroup, UniAlignmentDataset
from unialignment.data.feature_cache import (
    FORMAT_VERSION,
    cache_folder,
    components_fingerprint,
    image_stamp,
    source_fingerprint,
)
from unialignment.data.jsonl_index import JsonlIndex
from unialignment.data.sampler import SampleKey
from unialignment.data.transforms import IMAGE_ERRORS, SD3_SIZE_MULTIPLE
from unialignment.diffusion.draws import MicroStepDraws
from unialignment.frozen.components import FrozenComponents
from unialignment.frozen.text_encoder import TokenizedText
from unialignment.frozen.vae import FrozenVAE, pixels_to_pil

logger = logging.getLogger(__name__)


@dataclass
class TrainingBatch:
    """One micro-batch of one task, already encoded by the frozen components.

    target_latents: (B, C, H, W) clean VAE latents of the image to generate (t2i image, edit target).
    prompt_embeds: (B, L, D_t5) T5 states of the image stream's condition (t2i prompt, edit instruction).
    caption_ids: (B, L) T5 ids of the text the text stream models (the caption; for VQA prompt + answer).
    condition_latents: k tensors (B, C, H_i, W_i) of clean condition images (edit source, composition).
    caption_score_mask: (B, L) True on the tokens to noise and score (the answer of a VQA record);
        None for all tokens.
    caption_attention_mask: (B, L) real tokens, for the "real_tokens" text-loss normalisation.
    teacher_image_targets / teacher_text_targets: (B, D_teacher) frozen teacher features of the target
        image and of the caption; None skips that alignment term.
    text_stream_latents: (B, C, H, W) the clean image the text stream sees; defaults to target_latents.
        Text-only samples use the null image: pass `text_stream_uses_null_image=True`.
    draws: the micro-step's random numbers when they were drawn ahead (`prepare_training_batch` with `draw`);
        None lets the objective draw them.
    """

    target_latents: torch.Tensor
    prompt_embeds: torch.Tensor
    caption_ids: torch.Tensor
    condition_latents: list[torch.Tensor] | None = None
    caption_score_mask: torch.Tensor | None = None
    caption_attention_mask: torch.Tensor | None = None
    teacher_image_targets: torch.Tensor | None = None
    teacher_text_targets: torch.Tensor | None = None
    text_stream_latents: torch.Tensor | None = None
    text_stream_uses_null_image: bool = False
    draws: MicroStepDraws | None = None


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
        features["teacher_image"], features["teacher_text"] = _teacher_features(batch, components)
    return features


@torch.no_grad()
def _teacher_features(batch: RawBatch, components: FrozenComponents) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The teacher's image and text targets, or (None, None) without a teacher. The teacher sees the image whose
    caption the text stream models: the (edited) target. Inputs the DataLoader workers prepared are used as they
    are (`RawBatch.teacher_inputs`)."""
    teacher = components.teacher
    if teacher is None:
        return None, None
    if batch.teacher_inputs is not None:
        return teacher.targets_from_inputs(batch.teacher_inputs)
    return teacher.image_targets(pixels_to_pil(batch.target_pixels)), teacher.text_targets(batch.captions)


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
    draw: Callable[[torch.Size, TokenizedText], MicroStepDraws] | None = None,
) -> TrainingBatch:
    """Cached features when the batch carries them, else the frozen components online.

    With `draw` (the objective's draws for a latent shape and the caption; `speed.prefetch`), every random number of
    the micro-step is drawn on the host first, in the plain path's order (latent noise of the target and of each
    condition slot, then `draw`), and the batch goes to the device without a synchronisation: host tensors are
    copied with `non_blocking`, the latents are drawn on the device from host noise, and the prompts that condition
    dropout replaces are not encoded. The batch is the plain path's, number for number."""
    if draw is None:
        features = batch.features if batch.features is not None else compute_features(batch, components)
        return to_training_batch(batch, features, components.vae, generator, device, dtype)
    return _prepare_ahead(batch, components, generator, device, dtype, draw)


def _prepare_ahead(
    batch: RawBatch,
    components: FrozenComponents,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
    draw: Callable[[torch.Size, TokenizedText], MicroStepDraws],
) -> TrainingBatch:
    vae, t5, cached = components.vae, components.t5, batch.features
    non_blocking = torch.device(device).type == "cuda"

    def to_device(tensor: torch.Tensor, to_dtype: torch.dtype | None = None) -> torch.Tensor:
        return tensor.to(device, non_blocking=non_blocking).to(to_dtype or tensor.dtype)

    names = ["target", *(f"source_{slot}" for slot in range(batch.num_sources))]
    if cached is not None:
        shapes = [cached[f"{name}_mean"].shape for name in names]
    else:
        pixels = [batch.target_pixels, *batch.source_pixels]
        factor, channels = vae.downsample_factor, vae.latent_channels
        shapes = [torch.Size((p.shape[0], channels, p.shape[2] // factor, p.shape[3] // factor)) for p in pixels]
    # Host draws first, in the plain path's order: `vae.sample_latents` per slot, then the objective's.
    noises = [randn_tensor(shape, generator=generator, dtype=torch.float32) for shape in shapes]
    draws = draw(shapes[0], batch.caption)

    latents = []
    for slot, (name, noise) in enumerate(zip(names, noises, strict=True)):
        if cached is not None:
            mean = to_device(cached[f"{name}_mean"], torch.float32)
            std = to_device(cached[f"{name}_std"], torch.float32)
        else:
            mean, std = vae.latent_distribution(pixels[slot])
        latents.append(vae.scale(mean.float() + std.float() * to_device(noise)).to(dtype))

    if cached is not None:
        prompt_embeds = to_device(cached["prompt_embeds"], dtype)
        teacher_image, teacher_text = cached.get("teacher_image"), cached.get("teacher_text")
    else:
        prompt_embeds = _encode_kept_prompts(t5, batch.prompt_ids, draws.dropped).to(device, dtype)
        teacher_image, teacher_text = _teacher_features(batch, components)
    return TrainingBatch(
        target_latents=latents[0],
        prompt_embeds=prompt_embeds,
        caption_ids=to_device(batch.caption.input_ids),
        condition_latents=latents[1:] or None,
        caption_score_mask=to_device(batch.caption.score_mask),
        caption_attention_mask=to_device(batch.caption.attention_mask),
        teacher_image_targets=None if teacher_image is None else to_device(teacher_image, torch.float32),
        teacher_text_targets=None if teacher_text is None else to_device(teacher_text, torch.float32),
        draws=draws.to(device, non_blocking=non_blocking),
    )


@torch.no_grad()
def _encode_kept_prompts(t5, prompt_ids: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """T5 states of the prompts condition dropout keeps; the dropped rows are zeros (the objective puts the null
    prompt's states there)."""
    kept = (~dropped).nonzero().squeeze(1)  # on the host: no synchronisation
    states = torch.zeros((prompt_ids.shape[0], prompt_ids.shape[1], t5.hidden_size), dtype=t5.dtype, device=t5.device)
    if len(kept):
        states[kept.to(t5.device)] = t5.encode_ids(prompt_ids[kept])
    return states


@torch.no_grad()
def write_feature_cache(
    index: JsonlIndex,
    components: FrozenComponents,
    resolution: int,
    batch_size: int = 16,
    shard_size: int = 1024,
    storage_dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
    size_multiple: int = SD3_SIZE_MULTIPLE,
) -> Path:
    """Encode every valid record of `index` at `resolution` (square, as without aspect-ratio buckets) into the
    offline feature cache (`unialignment.data.feature_cache`); returns its folder."""
    folder = cache_folder(index.path, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    group = TaskGroup(str(index.path), 1.0, [index], [(resolution, resolution)], size_multiple)
    encoder = _ShardEncoder(group, components, batch_size, storage_dtype)
    bar = tqdm(total=len(index), desc=f"caching {index.path.name}", disable=not progress)
    for shard, shard_start in enumerate(range(0, len(index), shard_size)):
        tensors = encoder.encode(range(shard_start, min(len(index), shard_start + shard_size)), bar)
        save_file(tensors, folder / f"shard-{shard:05d}.safetensors")
    bar.close()
    meta = {
        "version": FORMAT_VERSION,
        "resolution": resolution,
        "num_rows": len(index),
        "source": source_fingerprint(Path(index.path)),
        "components": components_fingerprint(components),
        "shard_size": shard_size,
        "names": encoder.names,
        "storage_dtype": str(storage_dtype),
        "failures": encoder.failures,
    }
    # meta.json last: a cache without it is incomplete and never read.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    if encoder.failures:
        logger.warning(
            "%d records of %s could not be cached (marked invalid): %s",
            len(encoder.failures), index.path, encoder.failures[:5],
        )  # fmt: skip
    return folder


class _ShardEncoder:
    """The cache's rows of one shard: each record read as training reads it, then the frozen components."""

    def __init__(self, group: TaskGroup, components: FrozenComponents, batch_size: int, storage_dtype: torch.dtype):
        self.group, self.components, self.batch_size, self.storage_dtype = group, components, batch_size, storage_dtype
        self.dataset = UniAlignmentDataset([group], max_attempts=1)
        self.collator = Collator(components.t5.tokenizer, components.t5.max_length)
        self.names: list[str] | None = None
        self.failures: list[str] = []

    def encode(self, rows: range, bar: tqdm) -> dict[str, torch.Tensor]:
        columns: dict[str, list[torch.Tensor | None]] = {}
        valid = torch.zeros(len(rows), dtype=torch.uint8)
        num_sources = torch.zeros(len(rows), dtype=torch.uint8)
        stamps = torch.zeros(len(rows), dtype=torch.int64)
        for batch_start in range(0, len(rows), self.batch_size):
            samples, positions = [], []
            for position in range(batch_start, min(len(rows), batch_start + self.batch_size)):
                row = rows[position]
                try:
                    samples.append(self.dataset.prepare(self.group, row, SampleKey(0, 0, row, 0, 0)))
                    positions.append(position)
                    record = self.group.indexes[0].read_record(row)
                    stamps[position] = image_stamp([*record.source_images, record.target_image])
                except IMAGE_ERRORS as error:  # an unreadable record is marked invalid, never fatal
                    self.failures.append(f"{self.group.indexes[0].location(row)}: {type(error).__name__}: {error}")
            # Records of one file may differ in their number of condition images: encode each count apart.
            for count in sorted({s.num_sources for s in samples}):
                chosen = [(p, s) for p, s in zip(positions, samples, strict=True) if s.num_sources == count]
                features = compute_features(self.collator([s for _, s in chosen]), self.components)
                self.names = self.names or sorted(features)
                for name in self.names:
                    column = columns.setdefault(name, [None] * len(rows))
                    for (position, _), value in zip(chosen, features[name].cpu(), strict=True):
                        column[position] = value.to(self.storage_dtype)
                valid[[p for p, _ in chosen]] = 1
                num_sources[[p for p, _ in chosen]] = count
            bar.update(min(self.batch_size, len(rows) - batch_start))
        if self.names is None:
            path = self.group.indexes[0].path
            raise RuntimeError(f"no record of {path} could be read for the feature cache: {self.failures[:5]}")
        tensors = {"valid": valid, "num_sources": num_sources, "image_stamp": stamps}
        for name in self.names:
            present = [value for value in columns.get(name, []) if value is not None]
            if not present:  # a whole shard without this feature (no record had that many sources)
                continue
            template = torch.zeros_like(present[0])
            tensors[name] = torch.stack([template if value is None else value for value in columns[name]])
        return tensors
