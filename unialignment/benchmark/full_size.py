"""The frozen components at full size, as folders of configs, tokenizers and the image processor without weights:
T5 v1.1 XXL's encoder and SD3's tokenizer length, SD3's VAE, and the Qwen2.5-VL-7B teacher. The trainer's loader
builds them with random weights on the device (`load_frozen_components(..., random_weights=True)`), for the
benchmark and for memory estimates where no checkpoint can be downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from diffusers import AutoencoderKL
from torch import nn
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2VLImageProcessorPil,
    T5Config,
    T5Tokenizer,
)

from unialignment.frozen.components import ComponentsConfig
from unialignment.toy.components import TinyComponentFolders
from unialignment.toy.t5 import caption_corpus
from unialignment.toy.teacher import make_tiny_tokenizer
from unialignment.training.config import TrainConfig

# The frozen components at full size, as in ../shared/reference/full_size_components.json (tests/test_benchmark.py
# checks them against that file where it exists).
T5_XXL_ENCODER = dict(
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
)
T5_TOKENIZER_LENGTH = 32100  # len(SD3's tokenizer_3): the size of the transformer's text head
SD3_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
QWEN2_5_VL_7B_TEXT = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
)
QWEN2_5_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    num_heads=16,
    intermediate_size=3420,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    out_hidden_size=3584,
)
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json: the pixel budget that decides how many vision tokens an image is.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056


def synthetic_t5_tokenizer(length: int, corpus: list[str]) -> T5Tokenizer:
    """A T5 tokenizer of exactly `length` tokens (SD3's has 32100), laid out as T5's: `<pad>`, `</s>`, `<unk>`,
    pieces, then the 100 sentinels `<extra_id_99>` ... `<extra_id_0>` last. The pieces are the words and characters
    of `corpus` (so its captions tokenize without `<unk>`) and fillers up to `length`: the ids mean nothing, what the
    speed depends on is the size of the text head and of T5's embedding."""
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    words = sorted({word for text in corpus for word in text.split()})
    characters = sorted({character for word in words for character in word})
    pieces = [(f"▁{word}", -5.0) for word in words] + [("▁", -8.0)] + [(c, -10.0) for c in characters]
    fillers = length - 3 - len(pieces) - len(sentinels)
    if fillers < 0:
        raise ValueError(f"a {length}-token tokenizer cannot hold the {len(pieces)} pieces of the corpus")
    pieces += [(f"▁filler{i}", -20.0) for i in range(fillers)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, *sentinels]
    return T5Tokenizer(vocab=vocab, extra_ids=len(sentinels))


def write_full_size_folders(folder: Path) -> TinyComponentFolders:
    """Folders of the full-size frozen components holding configs, tokenizers and the image processor but no
    weights, in the layout `make_tiny_components` writes, so that one loader builds either size."""
    folders = TinyComponentFolders(folder / "tokenizer", folder / "text_encoder", folder / "vae", folder / "teacher")
    synthetic_t5_tokenizer(T5_TOKENIZER_LENGTH, caption_corpus()).save_pretrained(folders.tokenizer)
    T5Config(**T5_XXL_ENCODER).save_pretrained(folders.text_encoder)
    folders.vae.mkdir(parents=True)
    (folders.vae / "config.json").write_text(json.dumps({"_class_name": AutoencoderKL.__name__, **SD3_VAE}))
    # Multimodal RoPE splits the 128-wide heads' 64 frequencies over (time, height, width), as Qwen2.5-VL-7B does.
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    Qwen2_5_VLConfig(
        text_config=dict(QWEN2_5_VL_7B_TEXT, rope_parameters=rope), vision_config=QWEN2_5_VL_7B_VISION
    ).save_pretrained(folders.teacher)
    # The toy's Qwen2 tokenizer: a text target is an embedding lookup, whose cost does not depend on the ids.
    make_tiny_tokenizer().save_pretrained(folders.teacher)
    # Saved with the PIL backend; AutoImageProcessor then picks the backend the trainer would (torchvision if present).
    Qwen2VLImageProcessorPil(
        min_pixels=QWEN_MIN_PIXELS,
        max_pixels=QWEN_MAX_PIXELS,
        patch_size=QWEN2_5_VL_7B_VISION["patch_size"],
        merge_size=QWEN2_5_VL_7B_VISION["spatial_merge_size"],
        temporal_patch_size=QWEN2_5_VL_7B_VISION["temporal_patch_size"],
    ).save_pretrained(folders.teacher)
    return folders


def frozen_settings(folders: TinyComponentFolders, config: TrainConfig) -> ComponentsConfig:
    """The stage config's components settings pointed at the benchmark's folders (the trainer's loader builds them
    with `random_weights`: configs, tokenizers and processor from the folders, every weight drawn on the device)."""
    return dataclasses.replace(
        config.components,
        sd3=None,
        tokenizer=str(folders.tokenizer),
        text_encoder=str(folders.text_encoder),
        vae=str(folders.vae),
        teacher=str(folders.teacher),
        mask_embedding=None,
    )


def transformer_kwargs(config: TrainConfig, vocab_size: int) -> dict:
    """The arguments `build_transformer` gives a fresh transformer."""
    return {"vocab_size": vocab_size, **config.model.config}


def parameter_count(module: nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())
