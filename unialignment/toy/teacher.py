"""Tiny real Qwen2.5-VL teacher for tests, built locally in a second or two.

The folder has the layout of a Qwen2.5-VL checkpoint: config and weights saved by
`Qwen2_5_VLForConditionalGeneration.save_pretrained`, a Qwen2 byte-level BPE tokenizer trained here
on a small caption corpus, and a Qwen2-VL image processor whose pixel budget turns a 64x64 image into
16 patches (4 vision tokens after the 2x2 merge).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil

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


def make_tiny_tokenizer(vocab_size: int = 320) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer over a byte-level BPE trained on the tiny caption corpus."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, as in Qwen2
        show_progress=False,
    )
    bpe.train_from_iterator(caption_corpus(), trainer)
    bpe_model = json.loads(bpe.to_str())["model"]
    # transformers 5's Qwen2Tokenizer builds Qwen2's pre-tokenizer and decoder around a given
    # vocabulary and merge list, so only those two are carried over.
    return Qwen2Tokenizer(
        vocab=bpe_model["vocab"],
        merges=[tuple(merge) for merge in bpe_model["merges"]],
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def make_tiny_teacher(folder: Path, seed: int = 0) -> Path:
    """Build and save a tiny Qwen2.5-VL checkpoint into `folder`; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
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
