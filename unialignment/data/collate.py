"""Collating samples of one task group into a batch, with T5 token ids for both streams."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from unialignment.data.dataset import Sample
from unialignment.data.records import TaskKind
from unialignment.frozen.text_encoder import MAX_TEXT_LENGTH, TokenizedText, tokenize_captions
from unialignment.frozen.vae import pixels_to_pil


@dataclass
class RawBatch:
    """A micro-batch before the frozen components: pixels and token ids.

    target_pixels: (B, 3, H, W) in [-1, 1] (or uint8); source_pixels: k tensors (B, 3, H, W), one per condition
    slot. features: the frozen components' outputs read from the offline cache (then there are no pixels).
    prompt_ids: (B, L) T5 ids of the image stream's condition text. caption: the text stream's ids and masks.
    teacher_inputs: the teacher's preprocessed target image and caption, when the workers prepared them.
    """

    tasks: list[TaskKind]
    group: int
    num_sources: int
    target_pixels: torch.Tensor | None
    source_pixels: list[torch.Tensor] | None
    features: dict[str, torch.Tensor] | None
    prompt_ids: torch.Tensor
    caption: TokenizedText
    prompts: list[str]
    captions: list[str]
    questions: list[str]
    locations: list[str]
    record_keys: list[tuple[str, int]]
    step: int
    micro_step: int
    replaced: list[str]
    num_truncated: int
    teacher_inputs: dict | None = None

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def pin_memory(self) -> RawBatch:
        """The batch with every tensor in page-locked memory, so that it reaches the GPU with `non_blocking` copies
        that overlap computation. The DataLoader calls this in its pinning thread (`pin_memory=True`)."""
        return _map_tensors(self, lambda tensor: tensor.pin_memory())


def _map_tensors(value, function: Callable[[torch.Tensor], torch.Tensor]):
    """`value` with `function` applied to every tensor in it (dataclasses, dicts, lists and tuples are walked)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _map_tensors(getattr(value, f.name), function) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_tensors(item, function) for item in value)
    return value


class Collator:
    """`DataLoader(collate_fn=Collator(tokenizer))`: tokenizes in the workers, off the training process.

    `teacher_inputs`: the teacher's `input_preparer()`, run here on the batch's target images and captions so that
    the teacher's preprocessing also happens in the workers (`speed.teacher_inputs_in_workers`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = MAX_TEXT_LENGTH,
        teacher_inputs: Callable[[list[Image.Image], list[str]], dict] | None = None,
    ):
        self.tokenizer, self.max_length, self.teacher_inputs = tokenizer, max_length, teacher_inputs

    def __call__(self, samples: list[Sample]) -> RawBatch:
        source_counts = {sample.num_sources for sample in samples}
        if len(source_counts) > 1:
            listing = ", ".join(f"{s.location} ({s.num_sources})" for s in samples)
            raise ValueError(
                "a batch mixes records with different numbers of condition images; put compositions with a "
                f"different number of sources in their own task group: {listing}"
            )
        if len({sample.step for sample in samples}) > 1 or len({sample.group for sample in samples}) > 1:
            raise ValueError("a batch must come from one optimizer step and one task group (use TaskMixingSampler)")
        prompts = [sample.prompt for sample in samples]
        prompt_tokens = tokenize_captions(self.tokenizer, prompts, max_length=self.max_length)
        caption_tokens = tokenize_captions(
            self.tokenizer, [s.caption for s in samples], [s.question for s in samples], self.max_length
        )
        (num_sources,) = source_counts
        cached = samples[0].features is not None
        if any((sample.features is not None) != cached for sample in samples):
            raise ValueError(
                "a batch mixes cached and uncached samples; a task group uses its cache for all files or none"
            )
        teacher_inputs = None
        if self.teacher_inputs is not None and not cached:  # a cached batch carries the teacher's targets
            images = pixels_to_pil(torch.stack([sample.target_pixels for sample in samples]))
            teacher_inputs = self.teacher_inputs(images, [sample.caption for sample in samples])
        return RawBatch(
            tasks=[sample.task for sample in samples],
            group=samples[0].group,
            num_sources=num_sources,
            target_pixels=None if cached else torch.stack([sample.target_pixels for sample in samples]),
            source_pixels=None
            if cached
            else [torch.stack([s.source_pixels[k] for s in samples]) for k in range(num_sources)],
            features={name: torch.stack([s.features[name] for s in samples]) for name in samples[0].features}
            if cached
            else None,
            prompt_ids=prompt_tokens.input_ids,
            caption=caption_tokens,
            prompts=prompts,
            captions=[sample.caption for sample in samples],
            questions=[sample.question for sample in samples],
            locations=[sample.location for sample in samples],
            record_keys=[sample.record_key for sample in samples],
            step=samples[0].step,
            micro_step=samples[0].micro_step,
            replaced=[failure for sample in samples for failure in sample.replaced],
            num_truncated=prompt_tokens.num_truncated + caption_tokens.num_truncated,
            teacher_inputs=teacher_inputs,
        )
