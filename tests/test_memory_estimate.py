"""The training memory estimate (`scripts/train.py --check`, the README's table) against hand-computed terms, and
against the one full-size measurement it was checked with."""

import dataclasses

import pytest

from unialignment.training.config import DeepSpeedConfig, SpeedConfig, TrainConfig
from unialignment.training.memory import GiB, activation_bytes_per_sample, training_memory

SD3_MEDIUM = dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, patch_size=2, vocab_size=32100)
TINY = dict(num_layers=4, num_attention_heads=2, attention_head_dim=8, patch_size=2, vocab_size=50)  # D = 16


def test_activations_by_hand():
    # 16 image + 8 condition + 4 text tokens: the image-stream pass has 28 tokens, the text-stream pass 20.
    full = 4 * (18 * 16 * 28 * 2) + 4 * (18 * 16 * 20 * 2)
    assert activation_bytes_per_sample(TINY, 16, 8, 4, checkpoint_every=0) == full
    # every 2nd block of 4 checkpointed: 2 blocks keep everything, 2 keep their input, one is recomputed at a time
    expected = sum(2 * (18 * 16 * t * 2) + 2 * (16 * t * 2) + 18 * 16 * t * 2 for t in (28, 20))
    assert activation_bytes_per_sample(TINY, 16, 8, 4, checkpoint_every=2) == expected


def test_the_measured_full_size_pass_is_within_the_stated_error():
    """BENCHMARKS.md: forward + backward of both passes at 512 px, micro-batch 4, float32 weights and gradients with
    bf16 autocast, no checkpointing: 31.9 GiB text-to-image, 39.5 GiB edit, on an H100."""
    parameters = 2_124_000_000
    fixed = (4 + 4 + 2) * parameters  # weights, gradients, autocast's bf16 copies
    head = 3 * 4 * 256 * 32100  # logits, log-probabilities and their gradient per sample
    for conditions, measured in ((0, 31.9), (1024, 39.5)):
        activations = activation_bytes_per_sample(SD3_MEDIUM, 1024, conditions, 256, checkpoint_every=0) + head
        estimate = (fixed + 4 * activations) / GiB
        assert estimate == pytest.approx(measured, rel=0.2)


def test_every_term_by_hand():
    config = TrainConfig(
        deepspeed=DeepSpeedConfig(zero_stage=2, reduce_bucket_size=1000),
        speed=SpeedConfig(gradient_checkpointing=False, masked_text_loss=True),
    )
    config.data.groups = [{"name": "e", "datasets": [{"path": "x.jsonl", "task": "edit"}]}]
    config.components.text_length = 4
    config.batch.micro_batch_size = 3
    parameters, trainable, ranks = 10_000, 4_000, 4
    frozen = {"t5": 100, "vae": 20, "teacher": 30}
    estimate = training_memory(config, ranks, TINY, parameters, trainable, frozen, resolution=64, vae_downsampling=8)
    parts = estimate.parts
    assert parts["transformer weights"] == 2 * parameters  # bf16, whole on each rank below ZeRO-3
    assert parts["optimizer"] == 12 * trainable / ranks  # fp32 master weights and two moments, partitioned
    assert parts["gradients"] == 4 * trainable / ranks + 4 * 1000  # fp32 partitions and one reduce bucket
    assert parts["EMA"] == 4 * trainable / ranks
    assert parts["frozen components"] == 2 * 150  # bfloat16 by default
    # 64 px / 8 / patch 2: 4 x 4 = 16 image tokens, an edit's source as many again, 4 text tokens; no head logits
    assert parts["activations"] == 3 * activation_bytes_per_sample(TINY, 16, 16, 4, checkpoint_every=0)
    assert estimate.total == pytest.approx(sum(parts.values()))

    zero3 = training_memory(
        dataclasses.replace(
            config,
            deepspeed=DeepSpeedConfig(zero_stage=3, offload_optimizer=True),
            speed=SpeedConfig(gradient_checkpointing=False),  # the masked-only text loss needs ZeRO <= 2
        ),
        ranks, TINY, parameters, trainable, frozen, resolution=64,
    )  # fmt: skip
    assert zero3.parts["transformer weights"] == 2 * parameters / ranks and zero3.parts["optimizer"] == 0
