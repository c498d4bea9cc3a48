"""Frozen alignment teacher: the targets of intrinsic-modal (representation) alignment.

REPA-style representation alignment (Yu et al. 2024, "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think"): the alignment heads of both streams are
pulled toward a frozen encoder's representation of the same sample. UniAlignment's teacher is
Qwen2.5-VL (Bai et al. 2025, "Qwen2.5-VL Technical Report"); docs/METHOD.md sections 2 and 5.

Any frozen image-text encoder plugs in by subclassing `AlignmentTeacher`: it only has to turn a batch
of images and a batch of captions into one float32 vector of width `dim` each.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    BaseImageProcessor,
    PreTrainedTokenizerBase,
    Qwen2_5_VLModel,
)

from unialignment.frozen.random_weights import build_with_random_weights

# Checkpoint weights the teacher drops on purpose: the LLM's decoder layers and its LM head.
_DROPPED_WEIGHTS = re.compile(r"(^|\.)layers\.\d+\.|^lm_head\.")


def _drop_load_report(record: logging.LogRecord) -> bool:
    """A logging filter that keeps every record but transformers' per-key load report."""
    return "LOAD REPORT" not in record.getMessage()


class AlignmentTeacher(torch.nn.Module, abc.ABC):
    """A frozen image-text encoder giving one target vector per image and per caption.

    Implementations run without gradients and return float32 tensors of shape (B, dim) on their
    own device; `dim` is the width the alignment heads project to.
    """

    dim: int

    @abc.abstractmethod
    def image_targets(self, images: list[Image.Image]) -> torch.Tensor:
        """Image targets (B, dim) float32 for B images."""

    @abc.abstractmethod
    def text_targets(self, texts: list[str]) -> torch.Tensor:
        """Text targets (B, dim) float32 for B captions."""

    def input_preparer(self) -> Callable[[list[Image.Image], list[str]], dict]:
        """A picklable function of a batch's images and captions that the DataLoader workers run, off the training
        process (`speed.teacher_inputs_in_workers`); `targets_from_inputs` turns its result into the targets. By
        default it only carries the images and texts over; a teacher with preprocessing of its own overrides both."""
        return _carry_inputs

    def targets_from_inputs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(image targets, text targets) from what `input_preparer()` returned: equal to `image_targets` and
        `text_targets` of the same images and captions."""
        return self.image_targets(inputs["images"]), self.text_targets(inputs["texts"])

    def train(self, mode: bool = True) -> AlignmentTeacher:
        # A teacher is frozen: a trainer's `.train()` must not switch it out of eval mode.
        return super().train(False)


def _carry_inputs(images: list[Image.Image], texts: list[str]) -> dict:
    return {"images": images, "texts": texts}


class QwenVLInputs:
    """Qwen2.5-VL's preprocessing of the teacher's inputs, the one place it is done: images through the optional
    square resize and the image processor, captions through the tokenizer with the teacher's padding. Holds no
    model, so DataLoader workers can run it (`QwenVLTeacher.input_preparer`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BaseImageProcessor,
        image_size: int | None,
        max_text_length: int,
        pad_to_max_length: bool,
    ):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_size, self.max_text_length, self.pad_to_max_length = image_size, max_text_length, pad_to_max_length

    def images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """{"pixel_values", "image_grid_thw"} of the image processor."""
        if self.image_size is not None:
            size = (self.image_size, self.image_size)
            images = [image.resize(size, Image.Resampling.BICUBIC) for image in images]
        inputs = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}

    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask"}, padded to `max_text_length` or to the batch's longest caption."""
        tokens = self.tokenizer(
            texts,
            padding="max_length" if self.pad_to_max_length else "longest",
            max_length=self.max_text_length,
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def __call__(self, images: list[Image.Image], texts: list[str]) -> dict[str, torch.Tensor]:
        return {**self.images(images), **self.texts(texts)}


class QwenVLTeacher(AlignmentTeacher):
    """Qwen2.5-VL as the teacher (docs/METHOD.md section 2).

    Image target: mean over the image's tokens of `get_image_features` (the vision tower's merged
    tokens, already projected to the LLM width). Text target: mean of the LLM's input embeddings of the
    caption's tokens. With `average_padding` the pad embeddings are averaged in too: `pad_to="text_length"` pads
    every caption to `max_text_length` (the default, as docs/METHOD.md section 2 writes the method down), and
    `pad_to="longest_in_batch"` pads each batch to its longest caption, which is what the authors' code does (so a
    caption's target depends on the batch it came in). Without `average_padding` only real tokens count
    (beyond the reference).
    """

    def __init__(
        self,
        model: Qwen2_5_VLModel,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: BaseImageProcessor,
        average_padding: bool = True,
        max_text_length: int = 256,
        image_size: int | None = None,
        pad_to: Literal["text_length", "longest_in_batch"] = "text_length",
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.average_padding = average_padding
        self.max_text_length = max_text_length
        self.pad_to = pad_to
        self.image_size = image_size
        pad_to_max_length = average_padding and pad_to == "text_length"
        self.inputs = QwenVLInputs(tokenizer, image_processor, image_size, max_text_length, pad_to_max_length)
        self.dim = model.config.text_config.hidden_size
        vision_width = model.config.vision_config.out_hidden_size
        assert vision_width == self.dim, (
            f"The vision tower's output width ({vision_width}) must equal the LLM hidden size ({self.dim}): "
            "image and text targets share the alignment width `dim`."
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        average_padding: bool = True,
        max_text_length: int = 256,
        image_size: int | None = None,
        random_weights: bool = False,
        pad_to: Literal["text_length", "longest_in_batch"] = "text_length",
    ) -> QwenVLTeacher:
        """Load from a local Qwen2.5-VL folder (config, weights, tokenizer, preprocessor config).

        `image_size`, if given, resizes every image to image_size x image_size before the Qwen
        processor, so each image costs the same number of vision tokens whatever its resolution.
        `random_weights`: the folder holds no weights; they are drawn at random on `device` (benchmarks).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"Alignment teacher folder not found: {path}")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Alignment teacher folder {path} has no config.json; expected a Qwen2.5-VL checkpoint."
            )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        # The teacher needs only the vision tower and the LLM's input embeddings: dropping the decoder
        # layers keeps ~1.2B of Qwen2.5-VL-7B's 8.3B parameters in memory. Their checkpoint weights
        # are skipped; transformers' load report, which would list them all in every training log, is
        # replaced by a check that nothing else is unexpected and nothing is missing.
        config.text_config.num_hidden_layers = 0
        config.text_config.layer_types = []
        if random_weights:
            build = lambda: Qwen2_5_VLModel._from_config(config)  # noqa: E731
            model = build_with_random_weights(build, device, torch_dtype, seed=2)
        else:
            model = _load_checked(path, config, torch_dtype)
        # Not AutoProcessor: in transformers 5 the Qwen2.5-VL processor also builds a video processor,
        # which needs torchvision; the teacher uses only the tokenizer and the image processor.
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return cls(
            model.to(device),
            tokenizer,
            image_processor,
            average_padding=average_padding,
            max_text_length=max_text_length,
            image_size=image_size,
            pad_to=pad_to,
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def image_targets(self, images: list[Image.Image]) -> torch.Tensor:
        """Mean vision token per image, (B, dim) float32; all B images go through the tower at once."""
        inputs = self.inputs.images(images)
        return mean_image_tokens(self.model, inputs["pixel_values"], inputs["image_grid_thw"])

    @torch.no_grad()
    def text_targets(self, texts: list[str]) -> torch.Tensor:
        """Mean input embedding of each caption's tokens, (B, dim) float32."""
        tokens = self.inputs.texts(texts)
        return mean_text_embeddings(self.model, tokens["input_ids"], tokens["attention_mask"], self.average_padding)

    def input_preparer(self) -> QwenVLInputs:
        return self.inputs

    @torch.no_grad()
    def targets_from_inputs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        image = mean_image_tokens(self.model, inputs["pixel_values"], inputs["image_grid_thw"])
        text = mean_text_embeddings(self.model, inputs["input_ids"], inputs["attention_mask"], self.average_padding)
        return image, text


def _load_checked(path: Path, config, torch_dtype: torch.dtype) -> Qwen2_5_VLModel:
    """The checkpoint's weights for `config`: the decoder layers and LM head it drops are skipped quietly; anything
    else missing, unexpected or mismatched is an error naming the folder."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_drop_load_report)
    try:
        model, loading = Qwen2_5_VLModel.from_pretrained(
            path, config=config, dtype=torch_dtype, local_files_only=True, output_loading_info=True
        )
    finally:
        report_logger.removeFilter(_drop_load_report)
    missing = sorted(loading["missing_keys"])
    unexpected = sorted(key for key in loading["unexpected_keys"] if not _DROPPED_WEIGHTS.search(key))
    mismatched = sorted(str(entry) for entry in loading.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Alignment teacher {path} does not match its config.json: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, mismatched {mismatched[:5]} (first five of each; is it a Qwen2.5-VL checkpoint?)"
        )
    return model


# The two targets as functions of a Qwen2.5-VL model, so that a teacher can also be trained through exactly what
# it computes. Gradients flow where the caller allows them.


def mean_image_tokens(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """(B, dim) float32: per image, the mean of `get_image_features` (the vision tower's merged tokens, already
    projected to the LLM width). `pixel_values`: the image processor's (total patches, C * temporal * patch^2);
    `image_grid_thw`: (B, 3)."""
    device = model.device
    image_grid_thw = image_grid_thw.to(device)
    # The vision tower attends within each image only (block-diagonal attention over the concatenated patches),
    # so batching does not mix images.
    features = model.get_image_features(pixel_values.to(device), image_grid_thw)
    # transformers 5 returns an output object whose pooler_output is a tuple of per-image tensors; earlier
    # versions return that tuple, or one tensor concatenated over images.
    features = getattr(features, "pooler_output", features)
    if not isinstance(features, torch.Tensor):
        features = torch.cat(list(features))
    merge_size = model.config.vision_config.spatial_merge_size
    tokens_per_image = (image_grid_thw.prod(-1) // merge_size**2).tolist()
    assert sum(tokens_per_image) == features.shape[0], (
        f"get_image_features returned {features.shape[0]} tokens; image_grid_thw implies {sum(tokens_per_image)}."
    )
    per_image_tokens = torch.split(features.float(), tokens_per_image)  # B x (N_i, dim)
    return torch.stack([tokens.mean(0) for tokens in per_image_tokens])


def mean_text_embeddings(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, average_padding: bool
) -> torch.Tensor:
    """(B, dim) float32: the mean input embedding of each text's tokens; with `average_padding` the padding
    positions count too, else only real tokens (an empty text gets a zero target instead of NaN)."""
    device = model.device
    token_embeds = model.get_input_embeddings()(input_ids.to(device)).float()  # (B, L, dim)
    if average_padding:
        return token_embeds.mean(1)
    real_token_mask = attention_mask.to(device, torch.float32).unsqueeze(-1)  # (B, L, 1)
    return (token_embeds * real_token_mask).sum(1) / real_token_mask.sum(1).clamp(min=1.0)
