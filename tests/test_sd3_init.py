"""Initialising from SD3: exactly the expected tensors are copied, dropped and freshly initialised."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

from unialignment.models import UniAlignmentTransformer
from unialignment.models.sd3_init import init_from_sd3, plan_sd3_transfer
from unialignment.toy.transformer import TINY_UNIALIGNMENT_CONFIG, make_tiny_sd3

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

# The last block's new text branch: AdaLN-Zero for the text tokens (a different shape from SD3's
# AdaLN-continuous), the text attention output and the text feed-forward.
NEW_LAST_BLOCK = [
    "norm1_context.linear.weight",
    "norm1_context.linear.bias",
    "attn.to_add_out.weight",
    "attn.to_add_out.bias",
    "ff_context.net.0.proj.weight",
    "ff_context.net.0.proj.bias",
    "ff_context.net.2.weight",
    "ff_context.net.2.bias",
]
NEW_HEADS = ["null_image_embd", "text_proj_out.weight", "text_proj_out.bias"] + [
    f"siglip_adapter_{kind}.fc.{index}.{param}"
    for kind in ("img", "text")
    for index in (0, 2)
    for param in ("weight", "bias")
]
POOLED_PROJECTION = [f"time_text_embed.text_embedder.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
IMAGE_HEAD = {
    "image_norm_out.linear.weight": "norm_out.linear.weight",
    "image_norm_out.linear.bias": "norm_out.linear.bias",
    "image_proj_out.weight": "proj_out.weight",
    "image_proj_out.bias": "proj_out.bias",
}


def _expected(last_block):
    initialized = set(NEW_HEADS) | {f"transformer_blocks.{last_block}.{name}" for name in NEW_LAST_BLOCK}
    dropped = set(POOLED_PROJECTION) | {
        f"transformer_blocks.{last_block}.norm1_context.linear.{p}" for p in ("weight", "bias")
    }
    return initialized, dropped


def test_full_size_report_against_the_reference_tensor_lists():
    ours_path, sd3_path = (
        REFERENCE / "unialignment_transformer_tensors.json",
        REFERENCE / "sd3_medium_transformer_tensors.json",
    )
    if not ours_path.exists():
        pytest.skip("../shared/reference is not beside the checkout")
    config = json.loads((REFERENCE / "sd3_medium_transformer_config.json").read_text())
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    with torch.device("meta"):
        model = UniAlignmentTransformer(**config, vocab_size=32100)
    our_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert our_shapes == {name: tuple(shape) for name, shape in json.loads(ours_path.read_text())["tensors"].items()}
    report = plan_sd3_transfer(our_shapes, json.loads(sd3_path.read_text())["tensors"])
    initialized, dropped = _expected(last_block=23)
    assert set(report.initialized) == initialized and len(report.initialized) == 19
    assert set(report.dropped) == dropped
    assert report.renamed == IMAGE_HEAD
    assert len(report.copied) == 696 - 19


def test_tiny_sd3_folder_initialises_the_transformer(tmp_path):
    sd3_folder = make_tiny_sd3(tmp_path / "sd3")
    sd3_state = SD3Transformer2DModel.from_pretrained(sd3_folder).state_dict()
    extra = {
        key: TINY_UNIALIGNMENT_CONFIG[key]
        for key in ("teacher_dim", "alignment_hidden_dim", "num_null_image_tokens", "align_depth")
    }
    model, report = init_from_sd3(sd3_folder, vocab_size=TINY_UNIALIGNMENT_CONFIG["vocab_size"], **extra)
    last = TINY_UNIALIGNMENT_CONFIG["num_layers"] - 1
    initialized, dropped = _expected(last_block=last)
    assert set(report.initialized) == initialized and set(report.dropped) == dropped
    assert report.renamed == IMAGE_HEAD
    ours = model.state_dict()
    for our_name, sd3_name in report.copied.items():
        assert torch.equal(ours[our_name], sd3_state[sd3_name]), our_name
    assert model.config.vocab_size == 40 and model.config.num_layers == 3
    assert "copied" in report.summary() and "norm_out.linear.weight -> image_norm_out.linear.weight" in report.summary()
    # The result is an ordinary diffusers model: it saves and loads strictly.
    model.save_pretrained(tmp_path / "ua")
    UniAlignmentTransformer.from_pretrained(tmp_path / "ua")
