"""Analytic FLOP counts against hand-computed numbers."""

import json
from pathlib import Path
from types import SimpleNamespace

from unialignment.training.flops import recomputed_flops_per_sample, training_flops_per_sample, transformer_flops

REFERENCE_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "unialignment_transformer_config.json"
SD3_MEDIUM = dict(
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    joint_attention_dim=4096,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    vocab_size=32100,
)


def test_sd3_medium_block_flops_match_the_reference():
    if REFERENCE_CONFIG.is_file():
        assert {key: json.loads(REFERENCE_CONFIG.read_text())[key] for key in SD3_MEDIUM} == SD3_MEDIUM
    blocks = 24 * (1280 * 24 * 1536**2 + 4 * 1280**2 * 1536)
    assert blocks == 1_981_053_665_280  # "~1.98 TFLOP forward"
    embedders = 2 * 4096 * 1536 * 256 + 2 * 64 * 1536 * 1024
    assert transformer_flops(SD3_MEDIUM, 1024, 256, text_head=False, image_head=False) == blocks + embedders
    image_head = 2 * 1536 * 64 * 1024
    assert transformer_flops(SD3_MEDIUM, 1024, 256, text_head=False, image_head=True) == blocks + embedders + image_head


def test_tiny_config_by_hand():
    # D = 2 x 4 = 8, 2 blocks, patch 2 with 3 channels in and out (12 values), T5 width 5, vocab 7.
    config = SimpleNamespace(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        joint_attention_dim=5,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        vocab_size=7,
    )
    # 4 target + 2 condition + 3 text tokens: T = 9.
    block = 24 * 64 * 9 + 4 * 81 * 8  # 13824 + 2592
    context = 2 * 5 * 8 * 3
    patches = 2 * 12 * 8 * 6
    image_head = 2 * 8 * 12 * 4  # the target's 4 tokens only
    text_head = 2 * 8 * 7 * 3
    image_pass = transformer_flops(config, 4, 3, text_head=False, image_head=True, condition_tokens=2)
    assert image_pass == 2 * block + context + patches + image_head

    # The text-stream pass sees the target only (T = 7), and runs the text head.
    text_block = 24 * 64 * 7 + 4 * 49 * 8
    text_pass = transformer_flops(config, 4, 3, text_head=True, image_head=False)
    assert text_pass == 2 * text_block + context + 2 * 12 * 8 * 4 + text_head
    assert training_flops_per_sample(config, 4, 3, condition_tokens=2) == 3 * (image_pass + text_pass)


def test_recomputation_adds_the_checkpointed_blocks_forward():
    # SD3-medium at 512 px t2i: one block of one pass at T = 1280 is 1280 x 24 D^2 + 4 x 1280^2 D.
    block = 1280 * 24 * 1536**2 + 4 * 1280**2 * 1536
    assert recomputed_flops_per_sample(SD3_MEDIUM, 1024, 256, checkpoint_every=0) == 0
    assert recomputed_flops_per_sample(SD3_MEDIUM, 1024, 256, checkpoint_every=1) == 2 * 24 * block
    assert recomputed_flops_per_sample(SD3_MEDIUM, 1024, 256, checkpoint_every=2) == 2 * 12 * block
    # every 5th of 24 blocks: 4 of them (blocks 5, 10, 15, 20) in each pass
    assert recomputed_flops_per_sample(SD3_MEDIUM, 1024, 256, checkpoint_every=5) == 2 * 4 * block
    # an edit's image-stream pass also carries the 1024 condition tokens; its text-stream pass does not
    edit_block = 2304 * 24 * 1536**2 + 4 * 2304**2 * 1536
    assert recomputed_flops_per_sample(SD3_MEDIUM, 1024, 256, 1024, checkpoint_every=1) == 24 * (block + edit_block)
