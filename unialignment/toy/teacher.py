"""Tiny real Qwen2.5-VL teacher, built locally in a second or two, and a short contrastive pretraining of it on a
dataset's image-caption pairs (CLIP's objective, Radford et al. 2021).

The folder has the layout of a Qwen2.5-VL checkpoint: config and weights saved by
`Qwen2_5_VLForConditionalGeneration.save_pretrained`, a Qwen2 byte-level BPE tokenizer trained here
on a small caption corpus, and a Qwen2-VL image processor whose pixel budget turns a 64x64 image into
16 patches (4 vision tokens after the 2x2 merge).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from unialignment.alignment.contrastive import contrastive_loss
from unialignment.frozen.teacher import mean_image_tokens, mean_text_embeddings
from unialignment.toy.t5 import caption_corpus

# The special tokens of Qwen2.5-VL's tokenizer that its processor and config refer to.
SPECIAL_TOKENS = [
    "<|endoftext|>",  # pad, eos and unk, as in Qwen2
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PATCH_SIZE = 14
MERGE_SIZE = 2


def make_tiny_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer over a byte-level BPE trained on `corpus` (default: the tiny caption corpus)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, as in Qwen2
        show_progress=False,
    )
    bpe.train_from_iterator(caption_corpus() if corpus is None else corpus, trainer)
    bpe_model = json.loads(bpe.to_str())["model"]
    # transformers 5's Qwen2Tokenizer builds Qwen2's pre-tokenizer and decoder around a given
    # vocabulary and merge list, so only those two are carried over.
    return Qwen2Tokenizer(
        vocab=bpe_model["vocab"],
        merges=[tuple(merge) for merge in bpe_model["merges"]],
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def make_tiny_teacher(folder: Path, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Build and save a tiny Qwen2.5-VL checkpoint into `folder`, its tokenizer trained on `corpus` (default: the
    tiny caption corpus); returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    # A dataset's corpus gets room for its words to merge whole (256 byte pieces come first).
    tokenizer = make_tiny_tokenizer(vocab_size=320 if corpus is None else 1024, corpus=corpus)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            # Multimodal RoPE splits the head's 4 rotary frequencies over (time, height, width).
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=32,
            patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE,
            temporal_patch_size=2,
            # 56 px windows (2x2 merged tokens) rather than 112, so that the test images span several
            # windows and block 0's window attention differs from block 1's full attention.
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    # Seeded init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    # The PIL backend: the default Qwen2VLImageProcessor needs torchvision, absent from the CPU venv.
    # The saved config names Qwen2VLImageProcessor, so AutoImageProcessor picks whichever backend is
    # installed. Pixel budget: between one and 8x8 merged tokens' worth of pixels per image.
    factor = PATCH_SIZE * MERGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=factor**2,
        max_pixels=(8 * factor) ** 2,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
    )
    image_processor.save_pretrained(folder)
    return folder


@dataclass
class Retrieval:
    """Image -> caption top-1 accuracy over one image per distinct caption (`_ImageCaptionPairs.retrieval`)."""

    exact: float  # the image's own caption ranks first
    # ... or a caption made of the same tokens in another order does. The text target is a mean over token
    # embeddings, so it cannot tell "a red square and a blue circle" from "a blue square and a red circle": this is
    # what that target can reach, `exact` what the images ask of it.
    same_tokens: float

    def __str__(self) -> str:
        return f"{self.exact:.2f} ({self.same_tokens:.2f} up to token order)"


@dataclass
class TeacherPretrainingReport:
    steps: int
    first_loss: float  # symmetric InfoNCE of the first batch
    last_loss: float  # mean over the last tenth of the steps
    retrieval_before: Retrieval  # on the training pairs, before training
    retrieval_after: Retrieval  # the same after training
    heldout: Retrieval | None  # after training, on the held-out pairs (among the held-out captions); None: none given


def pretrain_tiny_teacher(
    folder: Path,
    images: list[str | Path],
    captions: list[str],
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 3e-3,
    temperature: float = 0.07,
    average_padding: bool = True,
    text_length: int = 256,
    seed: int = 0,
    heldout: tuple[list[str | Path], list[str]] | None = None,
) -> TeacherPretrainingReport:
    """Train the saved tiny teacher in place so that its two alignment targets agree on matching image-caption
    pairs, then save it over itself.

    Why: the intrinsic-modal loss pulls the transformer's block states toward the teacher's image and text targets.
    The real Qwen2.5-VL was trained on billions of pairs, so its mean vision token and its mean caption embedding
    both say what a picture shows; a random tiny teacher's targets are noise, and aligning to noise says nothing
    about what alignment does. This gives the tiny one the same kind of knowledge of its dataset: the vision tower
    and the input embeddings (exactly what the two targets read, `mean_image_tokens` and `mean_text_embeddings`,
    with the run's padding rule and text length) are trained with the symmetric InfoNCE of CLIP between the two.
    Pairs that share a caption are all positives of each other, so repeated descriptions are not pushed apart.
    `heldout` (images, captions) are only scored, after training.
    """
    folder = Path(folder)
    if len(images) != len(captions) or not images:
        raise ValueError(
            f"pretrain_tiny_teacher needs as many images as captions (got {len(images)} and {len(captions)})"
        )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    teacher = model.model
    data = _ImageCaptionPairs(images, captions, image_processor, tokenizer, text_length, average_padding)

    teacher.requires_grad_(False)
    trained = [*teacher.visual.parameters(), teacher.get_input_embeddings().weight]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    before = data.retrieval(teacher)
    teacher.train()
    losses = []
    pairs = data.pairs
    for _ in tqdm(range(steps), desc="teacher image-caption", leave=False):
        batch = pairs[torch.randint(len(pairs), (min(batch_size, len(pairs)),), generator=generator)]
        image_features, text_features = data.targets(teacher, batch)
        same_caption = (batch[:, 1, None] == batch[None, :, 1]).float()
        positives = same_caption / same_caption.sum(-1, keepdim=True)
        loss = contrastive_loss(image_features, text_features, temperature, positives=positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    teacher.eval().requires_grad_(False)
    after = data.retrieval(teacher)
    heldout_retrieval = None
    if heldout is not None and heldout[0]:
        heldout_pairs = _ImageCaptionPairs(*heldout, image_processor, tokenizer, text_length, average_padding)
        heldout_retrieval = heldout_pairs.retrieval(teacher)
    model.save_pretrained(folder)
    tail = losses[-max(1, steps // 10) :]
    return TeacherPretrainingReport(steps, losses[0], sum(tail) / len(tail), before, after, heldout_retrieval)


class _ImageCaptionPairs:
    """A dataset's (image, caption) pairs for the teacher: every distinct image preprocessed once (the processor's
    patches are concatenated over a batch), every distinct caption tokenized once with the run's padding rule."""

    def __init__(self, images, captions, image_processor, tokenizer, text_length: int, average_padding: bool):
        distinct_images = sorted(set(map(str, images)))
        image_index = {path: i for i, path in enumerate(distinct_images)}
        self.patches, self.grids = [], []
        for path in distinct_images:
            with Image.open(path) as image:
                processed = image_processor(images=[image.convert("RGB")], return_tensors="pt")
            self.patches.append(processed["pixel_values"])
            self.grids.append(processed["image_grid_thw"])
        distinct_captions = sorted(set(captions))
        caption_index = {caption: i for i, caption in enumerate(distinct_captions)}
        self.tokens = tokenizer(
            distinct_captions,
            padding="max_length" if average_padding else "longest",
            max_length=text_length,
            truncation=True,
            return_tensors="pt",
        )
        self.average_padding = average_padding
        pairs = [(image_index[str(i)], caption_index[c]) for i, c in zip(images, captions, strict=True)]
        self.pairs = torch.tensor(pairs)  # (N, 2): image row, caption row

    def targets(self, teacher, pair_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two alignment targets of the pairs `pair_rows`, exactly as the teacher computes them in training."""
        image_rows, caption_rows = pair_rows[:, 0].tolist(), pair_rows[:, 1]
        image_features = mean_image_tokens(
            teacher, torch.cat([self.patches[i] for i in image_rows]), torch.cat([self.grids[i] for i in image_rows])
        )
        text_features = mean_text_embeddings(
            teacher,
            self.tokens["input_ids"][caption_rows],
            self.tokens["attention_mask"][caption_rows],
            self.average_padding,
        )
        return image_features, text_features

    @torch.no_grad()
    def retrieval(self, teacher) -> Retrieval:
        """Top-1 image -> caption accuracy over one image per distinct caption (ties in captions are one class)."""
        first_pair = {}
        for row in self.pairs.tolist():
            first_pair.setdefault(row[1], row)
        rows = torch.tensor(list(first_pair.values()))
        every_caption = mean_text_embeddings(
            teacher, self.tokens["input_ids"], self.tokens["attention_mask"], self.average_padding
        )
        every_caption = F.normalize(every_caption, dim=-1)
        best = []
        for start in range(0, len(rows), 256):
            image_features = self.targets(teacher, rows[start : start + 256])[0]
            best.append((F.normalize(image_features, dim=-1) @ every_caption.T).argmax(-1))
        return score_retrieval(torch.cat(best), rows[:, 1], self.tokens["input_ids"], self.tokens["attention_mask"])


def score_retrieval(
    chosen: torch.Tensor, right: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> Retrieval:
    """`Retrieval` of the caption rows `chosen` against the `right` ones, two captions counting as the same tokens
    when their attended token ids are equal as multisets."""
    bags = [tuple(sorted(ids[mask.bool()].tolist())) for ids, mask in zip(input_ids, attention_mask, strict=True)]
    exact = int((chosen == right).sum()) / len(right)
    same = sum(bags[c] == bags[r] for c, r in zip(chosen.tolist(), right.tolist(), strict=True)) / len(right)
    return Retrieval(exact, same)
