"""The UniAlignment transformer: released-checkpoint layout, strict loading, what each pass computes."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from safetensors.torch import load_file, save_file

from unialignment.models import UniAlignmentTransformer
from unialignment.models.attention import PaddedJointAttnProcessor, attend
from unialignment.toy.transformer import TINY_UNIALIGNMENT_CONFIG, make_tiny_transformer

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _reference(name):
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} is not beside the checkout")
    return json.loads(path.read_text())


def test_full_size_matches_released_checkpoint_layout():
    tensors = _reference("unialignment_transformer_tensors.json")
    config = _reference("unialignment_transformer_config.json")
    assert config["_class_name"] == "SD3JointModelFlexible"
    with torch.device("meta"):
        model = UniAlignmentTransformer.from_config(config)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes == tensors["tensors"]
    assert len(shapes) == tensors["num_tensors"] == 696
    assert sum(t.numel() for t in model.state_dict().values()) == tensors["num_parameters"]
    # 2.124 B trainable: everything but SD3's fixed sin-cos position table.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_123_838_884
    # The widths the authors hard-coded come back as config defaults.
    assert (model.config.teacher_dim, model.config.alignment_hidden_dim) == (3584, 2048)
    assert (model.config.num_null_image_tokens, model.config.align_depth) == (8, 8)


def _inputs(batch=2, height=8, width=8, length=5):
    channels, width_text = TINY_UNIALIGNMENT_CONFIG["in_channels"], TINY_UNIALIGNMENT_CONFIG["joint_attention_dim"]
    return torch.randn(batch, channels, height, width), torch.randn(batch, length, width_text)


def test_save_and_load_round_trip(tmp_path):
    model = make_tiny_transformer().eval()
    model.save_pretrained(tmp_path)
    loaded = UniAlignmentTransformer.from_pretrained(tmp_path).eval()
    latents, text = _inputs()
    with torch.no_grad():
        expected = model(latents, text, 500.0, return_text_logits=True)
        got = loaded(latents, text, 500.0, return_text_logits=True)
    torch.testing.assert_close(got.velocity, expected.velocity)
    torch.testing.assert_close(got.text_logits, expected.text_logits)


def test_loads_folder_in_the_authors_layout(tmp_path):
    make_tiny_transformer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    authors_fields = set(_reference("unialignment_transformer_config.json"))
    config = {key: value for key, value in config.items() if key in authors_fields}
    config["_class_name"] = "SD3JointModelFlexible"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = UniAlignmentTransformer.from_pretrained(
        tmp_path, align_depth=2, teacher_dim=10, alignment_hidden_dim=20, num_null_image_tokens=3
    )
    assert model.config.vocab_size == TINY_UNIALIGNMENT_CONFIG["vocab_size"]


@pytest.mark.parametrize("change", ["missing", "unexpected", "mismatched"])
def test_loading_is_strict_and_names_the_tensor(tmp_path, change):
    make_tiny_transformer().save_pretrained(tmp_path)
    weights_path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights_path)
    if change == "missing":
        del state["text_proj_out.bias"]
        name = "text_proj_out.bias"
    elif change == "unexpected":
        state["time_text_embed.text_embedder.linear_1.weight"] = torch.zeros(16, 6)
        name = "time_text_embed.text_embedder.linear_1.weight"
    else:
        state["null_image_embd"] = torch.zeros(1, 4, 16)
        name = "null_image_embd"
    save_file(state, weights_path)
    with pytest.raises((ValueError, RuntimeError), match=name.replace(".", r"\.")):
        UniAlignmentTransformer.from_pretrained(tmp_path)


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_each_pass_computes_only_what_it_is_asked_for():
    model = make_tiny_transformer().eval()
    text_head_calls, image_head_calls = _count_calls(model.text_proj_out), _count_calls(model.image_proj_out)
    latents, text = _inputs()
    with torch.no_grad():
        sampling = model(latents, text, 700.0)
        assert sampling.velocity.shape == latents.shape
        assert sampling.text_logits is None and sampling.image_alignment is None
        assert (len(image_head_calls), len(text_head_calls)) == (1, 0)

        caption = model(latents, text, 0.0, return_velocity=False, return_text_logits=True)
        assert caption.velocity is None
        assert caption.text_logits.shape == (2, 5, TINY_UNIALIGNMENT_CONFIG["vocab_size"])
        assert (len(image_head_calls), len(text_head_calls)) == (1, 1)

        everything = model(
            latents, text, 0.0, return_text_logits=True, return_hidden_states=True, return_alignment=True
        )
    assert everything.image_hidden_states.shape == (2, 16, 16)
    assert everything.text_hidden_states.shape == (2, 5, 16)
    assert everything.image_alignment.shape == everything.text_alignment.shape == (2, 10)


def test_null_image_for_text_only_samples():
    model = make_tiny_transformer().eval()
    _, text = _inputs()
    with torch.no_grad():
        out = model(None, text, 0.0, return_velocity=False, return_text_logits=True, return_alignment=True)
    assert out.text_logits.shape == (2, 5, 40)
    with pytest.raises(ValueError, match="return_velocity"):
        model(None, text, 0.0)


def test_text_positions_break_the_all_mask_symmetry():
    # T5 states of an all-mask text are the same vector at every position. Without a position table the text
    # stream then predicts one distribution everywhere; with it, positions differ; off, the model is unchanged.
    latents, _ = _inputs()
    text = torch.randn(2, 1, TINY_UNIALIGNMENT_CONFIG["joint_attention_dim"]).expand(2, 6, -1)
    outputs = {}
    for enabled in (False, True):
        model = make_tiny_transformer(text_position_embedding=enabled).eval()
        with torch.no_grad():
            outputs[enabled] = model(latents, text, 0.0, return_velocity=False, return_text_logits=True).text_logits
    plain, positioned = outputs[False], outputs[True]
    torch.testing.assert_close(plain, plain[:, :1].expand_as(plain))
    assert (positioned[:, 1:] - positioned[:, :1]).abs().amax() > 1e-2
    # same weights: the table is the only difference, and it holds no weights to save or load
    assert (
        make_tiny_transformer().state_dict().keys()
        == make_tiny_transformer(text_position_embedding=True).state_dict().keys()
    )


def test_interpolation_scale_spreads_the_image_position_table(tmp_path):
    # SD3's table (scale 1) places a small grid's neighbouring positions nearly on top of each other; a smaller scale
    # spreads them (neighbours' cosine falls), the table is saved with the weights and loaded back unchanged.
    def neighbour_cosine(model) -> float:
        table = model.pos_embed.cropped_pos_embed(8, 8)[0]  # the 4 x 4 token grid of an 8 x 8 latent
        return float(torch.cosine_similarity(table[5], table[6], dim=0))

    sd3, spread = make_tiny_transformer(), make_tiny_transformer(interpolation_scale=0.125)
    assert neighbour_cosine(sd3) > 0.99 and neighbour_cosine(spread) < 0.95
    assert sd3.state_dict().keys() == spread.state_dict().keys()
    spread.save_pretrained(tmp_path)
    loaded = UniAlignmentTransformer.from_pretrained(tmp_path)
    assert loaded.config.interpolation_scale == 0.125
    torch.testing.assert_close(loaded.pos_embed.pos_embed, spread.pos_embed.pos_embed)


def test_condition_images_change_the_target_output_and_are_not_decoded():
    model = make_tiny_transformer().eval()
    latents, text = _inputs()
    condition_a, condition_b = torch.randn_like(latents), torch.randn_like(latents)
    small_condition = torch.randn(2, 4, 4, 6)  # composition sources need not share the target's size
    with torch.no_grad():
        plain = model(latents, text, 300.0).velocity
        with_a = model(latents, text, 300.0, [condition_a]).velocity
        with_b = model(latents, text, 300.0, [condition_b]).velocity
        composed = model(latents, text, 300.0, [condition_a, small_condition]).velocity
    assert with_a.shape == composed.shape == latents.shape
    assert not torch.allclose(with_a, plain, atol=1e-4)
    assert not torch.allclose(with_a, with_b, atol=1e-4)


def test_only_target_tokens_are_pooled_for_alignment():
    model = make_tiny_transformer().eval()
    latents, text = _inputs()
    condition = torch.randn_like(latents)
    captured = {}
    align_block = model.transformer_blocks[model.config.align_depth - 1]
    align_block.register_forward_hook(lambda _m, _i, out: captured.update(text=out[0], image=out[1]))
    with torch.no_grad():
        out = model(latents, text, 300.0, [condition], return_alignment=True)
        num_target = (8 // 2) * (8 // 2)
        assert captured["image"].shape[1] == 2 * num_target
        expected_image = model.siglip_adapter_img.fc(captured["image"][:, :num_target].mean(dim=1))
        expected_text = model.siglip_adapter_text.fc(captured["text"].mean(dim=1))
    torch.testing.assert_close(out.image_alignment, expected_image)
    torch.testing.assert_close(out.text_alignment, expected_text)


def test_gradient_checkpointing_gives_the_same_gradients():
    latents, text = _inputs()
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_transformer()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(latents, text, 400.0, [latents.flip(-1)], return_text_logits=True)
        (out.velocity.square().mean() + out.text_logits.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dual_attention_layers", [(), (0,)])
def test_padded_narrow_heads_compute_what_diffusers_joint_attention_does(dual_attention_layers):
    """The tiny model's 8-wide heads through PaddedJointAttnProcessor (`pad_narrow_heads`, the
    `speed.pad_narrow_heads` switch) and through diffusers' own: same outputs and gradients."""
    latents, text = _inputs()
    results = []
    for processor in ("padded", "diffusers"):
        model = make_tiny_transformer(qk_norm="rms_norm", dual_attention_layers=dual_attention_layers)
        attentions = [a for block in model.transformer_blocks for a in (block.attn, block.attn2) if a is not None]
        assert len(attentions) == model.config.num_layers + len(dual_attention_layers)
        assert all(isinstance(a.processor, JointAttnProcessor2_0) for a in attentions)
        if processor == "padded":
            model.pad_narrow_heads()
            assert all(isinstance(a.processor, PaddedJointAttnProcessor) for a in attentions)
        out = model(latents, text, 400.0, [latents.flip(-1)], return_text_logits=True, return_alignment=True)
        (out.velocity.square().mean() + out.text_logits.square().mean() + out.image_alignment.mean()).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.velocity, out.text_logits, out.image_alignment, grads))
    (velocity, logits, alignment, grads), (velocity_0, logits_0, alignment_0, grads_0) = results
    torch.testing.assert_close(velocity, velocity_0)
    torch.testing.assert_close(logits, logits_0)
    torch.testing.assert_close(alignment, alignment_0)
    assert grads.keys() == grads_0.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_0[name], msg=name)


def test_attend_pads_only_narrow_heads_and_keeps_their_scale():
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 2, 4, 7, 8, dtype=torch.float64)
    # Hand-written attention with the 8-wide heads' own scale, 1/sqrt(8).
    expected = torch.softmax(query @ key.transpose(-1, -2) / 8**0.5, dim=-1) @ value
    torch.testing.assert_close(attend(query, key, value), expected)
    wide_query, wide_key, wide_value = (torch.cat([t, t], dim=-1) for t in (query, key, value))
    expected_wide = torch.softmax(wide_query @ wide_key.transpose(-1, -2) / 16**0.5, dim=-1) @ wide_value
    torch.testing.assert_close(attend(wide_query, wide_key, wide_value), expected_wide)


def test_bad_inputs_are_clear_errors():
    model = make_tiny_transformer()
    latents, text = _inputs()
    with pytest.raises(ValueError, match=r"condition_latents\[0\]"):
        model(latents, text, 1.0, [torch.randn(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(torch.randn(2, 4, 7, 8), text, 1.0)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(latents, torch.randn(2, 5, 13), 1.0)
    with pytest.raises(ValueError, match="align_depth"):
        make_tiny_transformer(align_depth=4)
