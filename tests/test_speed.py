"""Every training-speed switch (`speed` in the training config) against the plain path, on the same batch and seed:
equal losses and gradients, exactly where the math is the same and within float tolerance where kernels or batch
shapes differ. Then all switches at once through the real trainer, against a plain run."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from unialignment.data import collate
from unialignment.data.collate import Collator
from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
from unialignment.data.features import prepare_training_batch
from unialignment.data.sampler import SampleKey
from unialignment.data.transforms import load_image, prepare_images, to_pixels, to_uint8_pixels
from unialignment.frozen.vae import uint8_to_pixels
from unialignment.toy.components import load_tiny_components, make_tiny_components
from unialignment.toy.shapes import all_scenes, draw_scene
from unialignment.toy.transformer import make_tiny_transformer
from unialignment.training.objective import ObjectiveConfig, UniAlignmentObjective

REPO = Path(__file__).resolve().parents[1]
TEXT_LENGTH = 16


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return load_tiny_components(make_tiny_components(tmp_path_factory.mktemp("components")), TEXT_LENGTH)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shapes images with t2i, edit and VQA records."""
    root = tmp_path_factory.mktemp("world")
    scenes = all_scenes()[:8]
    for number, scene in enumerate(scenes):
        draw_scene(scene, 40).save(root / f"{number}.png")
    t2i, edit, vqa = [], [], []
    for number, scene in enumerate(scenes):
        turns = [{"from": "human", "value": scene.caption}, {"from": "gpt", "value": "<image>"}]
        t2i.append({"image": [f"{number}.png"], "conversations": turns})
        following = (number + 1) % len(scenes)
        turns = [{"from": "human", "value": scenes[following].caption}, {"from": "gpt", "value": ""}]
        edit.append({"image": [f"{number}.png", f"{following}.png"], "conversations": turns, "instruction": "change"})
        turns = [{"from": "human", "value": "<image>what is it?"}, {"from": "gpt", "value": scene.caption}]
        vqa.append({"image": [f"{number}.png"], "conversations": turns, "task": "vqa"})
    for name, records in (("t2i", t2i), ("edit", edit), ("vqa", vqa)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def _groups(world, names=("t2i", "edit", "vqa")):
    tasks = {"t2i": "t2i", "edit": "edit", "vqa": "vqa"}
    specs = [{"name": n, "datasets": [{"path": str(world / f"{n}.jsonl"), "task": tasks[n]}]} for n in names]
    return build_task_groups(specs, 32)


def _raw(world, components, name, uint8=False, teacher_inputs=False, size=4):
    (group,) = _groups(world, (name,))
    dataset = UniAlignmentDataset([group], uint8_pixels=uint8)
    preparer = components.teacher.input_preparer() if teacher_inputs else None
    collator = Collator(components.t5.tokenizer, TEXT_LENGTH, preparer)
    return collator([dataset[SampleKey(0, 0, index, 0, 0)] for index in range(size)])


def _model(components, seed=0, **overrides):
    return make_tiny_transformer(
        seed,
        joint_attention_dim=components.t5.hidden_size,
        vocab_size=components.t5.vocab_size,
        teacher_dim=components.teacher.dim,
        **overrides,
    )


def _objective(components, fuse=False, masked=False, chunk=7, **config):
    t5 = components.t5
    return UniAlignmentObjective(
        ObjectiveConfig(**config),
        FlowMatchEulerDiscreteScheduler(),
        t5.mask_token_id,
        t5.encode_ids,
        t5.null_prompt_embeds(),
        fuse_t2i_passes=fuse,
        masked_text_loss=masked,
        text_loss_chunk_size=chunk,
    )


def _losses_and_grads(model, objective, batch, seed_or_generator=3):
    generator = seed_or_generator
    if isinstance(seed_or_generator, int):
        generator = torch.Generator().manual_seed(seed_or_generator)
    model.zero_grad(set_to_none=True)
    losses = objective(model, batch, generator)
    losses.total.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return {name: value.detach() for name, value in vars(losses).items()}, grads


def _assert_same(a, b, exact=False, rtol=1e-4, atol=1e-6):
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    assert losses_a.keys() == losses_b.keys() and grads_a.keys() == grads_b.keys()
    for name in [*losses_a, *grads_a]:
        x, y = (losses_a, losses_b) if name in losses_a else (grads_a, grads_b)
        if exact:
            assert torch.equal(x[name], y[name]), name
        else:
            torch.testing.assert_close(x[name], y[name], rtol=rtol, atol=atol, msg=name)


def _prepared(raw, components, draw=None, seed=0):
    return prepare_training_batch(raw, components, torch.Generator().manual_seed(seed), "cpu", torch.float32, draw)


def _draw(objective, generator):
    def draw(latent_shape, caption):
        return objective.draw(latent_shape, caption.input_ids, caption.score_mask, caption.attention_mask, generator)

    return draw


# --- draws ahead, dropped prompts not encoded, non-blocking copies ------------------------------------------------


@pytest.mark.parametrize("task", ["t2i", "edit", "vqa"])
def test_drawing_ahead_gives_the_plain_batch_and_losses(world, components, task):
    """`speed.prefetch`: every random number drawn on the host before the device work, in the plain order; the
    prompts condition dropout replaces are not encoded. Same latents exactly, same losses and gradients."""
    raw = _raw(world, components, task, size=8)
    model = _model(components)
    objective = _objective(components, condition_dropout=0.5)

    plain_generator = torch.Generator().manual_seed(0)
    plain_batch = prepare_training_batch(raw, components, plain_generator, "cpu")
    plain = _losses_and_grads(model, objective, plain_batch, plain_generator)

    encoded_rows = []
    encode_ids = components.t5.encode_ids
    components.t5.encode_ids = lambda ids: encoded_rows.append(ids.shape[0]) or encode_ids(ids)
    try:
        ahead_generator = torch.Generator().manual_seed(0)
        ahead_batch = prepare_training_batch(
            raw, components, ahead_generator, "cpu", torch.float32, _draw(objective, ahead_generator)
        )
    finally:
        del components.t5.encode_ids
    kept = int((~ahead_batch.draws.dropped).sum())
    assert 0 < kept < len(raw) and encoded_rows == [kept]  # with 8 samples seed 0 drops some, not all
    # The same numbers were drawn: the generator is where the plain micro-step left it.
    assert torch.equal(ahead_generator.get_state(), plain_generator.get_state())
    assert torch.equal(ahead_batch.target_latents, plain_batch.target_latents)
    for a, b in zip(ahead_batch.condition_latents or [], plain_batch.condition_latents or [], strict=True):
        assert torch.equal(a, b)
    ahead = _losses_and_grads(model, objective, ahead_batch, None)
    # The kept prompts went through T5 as a smaller batch: equal to float rounding.
    _assert_same(plain, ahead, rtol=1e-5, atol=1e-6)


def test_draws_made_ahead_equal_the_inline_draws_exactly(world, components):
    batch = _prepared(_raw(world, components, "vqa"), components)
    model, objective = _model(components), _objective(components, text_loss_normalization="real_tokens")
    inline = _losses_and_grads(model, objective, batch, 7)
    generator = torch.Generator().manual_seed(7)
    draws = objective.draw(
        batch.target_latents.shape, batch.caption_ids, batch.caption_score_mask, batch.caption_attention_mask, generator
    )
    ahead = _losses_and_grads(model, objective, dataclasses.replace(batch, draws=draws), 12345)
    _assert_same(inline, ahead, exact=True)
    # The question tokens of a VQA record are never masked, and the masked positions are those the loss scores.
    assert not (draws.noisy_ids[~batch.caption_score_mask.bool()] == components.t5.mask_token_id).any()
    masked = (draws.noisy_ids == components.t5.mask_token_id) & batch.caption_attention_mask.bool()
    assert torch.equal(draws.masked_index, masked.flatten().nonzero().squeeze(1))


def test_the_collated_batch_pins_every_tensor(world, components, monkeypatch):
    """`pin_memory=True` in the DataLoader calls `RawBatch.pin_memory`; every tensor of the batch goes through it
    (pinning itself needs an accelerator, so it is replaced by a marking copy here)."""
    raw = _raw(world, components, "edit", uint8=True, teacher_inputs=True)
    pinned_ids = set()

    def pin(tensor):
        copy = tensor.clone()
        pinned_ids.add(id(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    pinned = torch.utils.data._utils.pin_memory.pin_memory(raw)
    tensors = []
    collate._map_tensors(pinned, lambda tensor: tensors.append(tensor) or tensor)
    assert len(tensors) >= 8 and all(id(tensor) in pinned_ids for tensor in tensors)
    assert torch.equal(pinned.target_pixels, raw.target_pixels) and pinned.locations == raw.locations


# --- uint8 pixels, the teacher's preprocessing in the workers -------------------------------------------------------


def test_uint8_pixels_scale_to_the_same_numbers(world, components):
    image = Image.open(world / "3.png").convert("RGB")
    assert torch.equal(uint8_to_pixels(to_uint8_pixels(image)), to_pixels(image))
    as_float, as_uint8 = _raw(world, components, "edit"), _raw(world, components, "edit", uint8=True)
    assert as_uint8.target_pixels.dtype == torch.uint8 and as_float.target_pixels.dtype == torch.float32
    pairs = [(as_float.target_pixels, as_uint8.target_pixels), (as_float.source_pixels[0], as_uint8.source_pixels[0])]
    for a, b in pairs:
        assert torch.equal(uint8_to_pixels(b), a)
    a, b = _prepared(as_float, components), _prepared(as_uint8, components)
    for name in ("target_latents", "prompt_embeds", "teacher_image_targets", "teacher_text_targets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.condition_latents[0], b.condition_latents[0])


def test_teacher_inputs_prepared_in_workers_give_the_same_targets(world, components):
    plain = _prepared(_raw(world, components, "t2i"), components)
    (group,) = _groups(world, ("t2i",))
    dataset = UniAlignmentDataset([group], uint8_pixels=True)
    collator = Collator(components.t5.tokenizer, TEXT_LENGTH, components.teacher.input_preparer())
    keys = [[SampleKey(0, 0, index, 0, 0) for index in range(4)]]
    (raw,) = list(DataLoader(dataset, batch_sampler=keys, collate_fn=collator, num_workers=1))
    assert raw.teacher_inputs is not None and "pixel_values" in raw.teacher_inputs
    ahead = _prepared(raw, components)
    assert torch.equal(ahead.teacher_image_targets, plain.teacher_image_targets)
    assert torch.equal(ahead.teacher_text_targets, plain.teacher_text_targets)


# --- the objective: fused passes, the masked-only text loss ---------------------------------------------------------


@pytest.mark.parametrize("normalization", ["batch_length", "real_tokens"])
def test_fused_text_to_image_passes_equal_two_passes(world, components, normalization):
    batch = _prepared(_raw(world, components, "t2i"), components)
    model = _model(components)
    two = _losses_and_grads(model, _objective(components, text_loss_normalization=normalization), batch)
    one = _losses_and_grads(model, _objective(components, fuse=True, text_loss_normalization=normalization), batch)
    _assert_same(two, one, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("task", ["edit", "vqa"])
def test_fusing_leaves_batches_whose_passes_differ_in_length_alone(world, components, task):
    batch = _prepared(_raw(world, components, task), components)
    if task == "vqa":
        batch.text_stream_uses_null_image = True
    calls = []
    model = _model(components)
    model.register_forward_hook(lambda module, args, kwargs, output: calls.append(1), with_kwargs=True)
    fused = _losses_and_grads(model, _objective(components, fuse=True), batch)
    assert len(calls) == 2
    _assert_same(_losses_and_grads(model, _objective(components), batch), fused, exact=True)


@pytest.mark.parametrize("task", ["t2i", "vqa"])
def test_masked_only_text_loss_equals_the_full_head(world, components, task):
    batch = _prepared(_raw(world, components, task), components)
    model = _model(components)
    for normalization in ("batch_length", "real_tokens"):
        full = _losses_and_grads(model, _objective(components, text_loss_normalization=normalization), batch)
        masked = _losses_and_grads(
            model, _objective(components, masked=True, text_loss_normalization=normalization), batch
        )
        _assert_same(full, masked, rtol=1e-5, atol=1e-7)


def test_every_objective_switch_together_equals_the_plain_objective(world, components):
    batch = _prepared(_raw(world, components, "t2i"), components)
    model = _model(components)
    plain = _losses_and_grads(model, _objective(components), batch)
    fast = _losses_and_grads(model, _objective(components, fuse=True, masked=True, chunk=5), batch)
    _assert_same(plain, fast, rtol=1e-5, atol=1e-7)


# --- the transformer: selective checkpointing, compiled blocks ------------------------------------------------------


def test_checkpointing_every_kth_block_gives_the_same_gradients_exactly(world, components):
    batch = _prepared(_raw(world, components, "edit"), components)
    objective = _objective(components)
    model = _model(components, num_layers=4)
    reference = _losses_and_grads(model, objective, batch)
    recomputed = []
    for every in (1, 2, 3):
        model.enable_gradient_checkpointing()
        model.checkpoint_every = every
        calls, original = [], model._gradient_checkpointing_func

        def counted(*args, calls=calls, original=original, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        model._gradient_checkpointing_func = counted
        _assert_same(reference, _losses_and_grads(model, objective, batch), exact=True)
        del model._gradient_checkpointing_func
        recomputed.append(len(calls))
    # Two passes (image and text stream) per micro-step: blocks k, 2k, ... of 4 are checkpointed in each.
    assert recomputed == [2 * 4, 2 * 2, 2 * 1]


def test_compiled_blocks_equal_eager_blocks_with_checkpointing(world, components):
    """Regional compilation (inductor runs on the CPU too), with activation checkpointing around the compiled
    blocks; a second resolution recompiles the blocks, not the model, and still agrees."""
    torch._dynamo.reset()
    model = _model(components)
    objective = _objective(components)
    batch = _prepared(_raw(world, components, "edit"), components)
    eager = _losses_and_grads(model, objective, batch)
    model.enable_gradient_checkpointing()
    model.compile_blocks()
    compiled = _losses_and_grads(model, objective, batch)
    _assert_same(eager, compiled, rtol=1e-4, atol=1e-6)
    assert all(block._compiled_call_impl is not None for block in model.transformer_blocks)

    larger = dataclasses.replace(
        batch,
        target_latents=torch.nn.functional.interpolate(batch.target_latents, scale_factor=2),
        condition_latents=[torch.nn.functional.interpolate(batch.condition_latents[0], scale_factor=2)],
    )
    compiled = _losses_and_grads(model, objective, larger)
    model.disable_gradient_checkpointing()
    for block in model.transformer_blocks:
        block._compiled_call_impl = None
    _assert_same(_losses_and_grads(model, objective, larger), compiled, rtol=1e-4, atol=1e-6)


# --- data loading ---------------------------------------------------------------------------------------------------


def test_draft_decoding_covers_the_target_and_stays_close(tmp_path):
    """A JPEG four times the target is decoded at a quarter scale, still covering it; the prepared pixels stay close
    to those of a full decode. Other formats and small JPEGs decode fully."""
    scene = all_scenes()[5]
    draw_scene(scene, 128).save(tmp_path / "large.jpg", quality=95)
    draw_scene(scene, 128).save(tmp_path / "large.png")
    draw_scene(scene, 48).save(tmp_path / "small.jpg", quality=95)
    drafted = load_image(tmp_path / "large.jpg", cover=(32, 32))
    assert drafted.size == (32, 32) and load_image(tmp_path / "large.jpg").size == (128, 128)
    assert load_image(tmp_path / "large.png", cover=(32, 32)).size == (128, 128)
    assert load_image(tmp_path / "small.jpg", cover=(32, 32)).size == (48, 48)
    full, _ = prepare_images(load_image(tmp_path / "large.jpg"), [], 32, 32)
    draft, _ = prepare_images(drafted, [], 32, 32)
    assert (full - draft).abs().mean() < 0.05


# --- all at once, through the trainer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_assets():
    subprocess.run([sys.executable, "scripts/make_debug_assets.py"], cwd=REPO, check=True, capture_output=True)


def test_every_switch_at_once_trains_like_the_plain_path(tmp_path, debug_assets):
    """The debug config (ZeRO-2, fp32) for a few steps with every `speed` switch on, against the plain run: the same
    losses and weights to float tolerance. Compiled blocks under DeepSpeed with checkpointing every other block."""

    def train(work_dir, *overrides):
        command = [sys.executable, "scripts/train.py", "configs/debug.py", "--work_dir", str(work_dir)]
        quiet = ["--max_steps", "3", "--logging.every_steps", "1", "--logging.sample_every_steps", "0"]
        result = subprocess.run(
            [*command, *quiet, "--checkpoint.every_steps", "3", *overrides],
            cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-5000:]
        metrics = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(work_dir / "export" / "raw" / "diffusion_pytorch_model.safetensors")
        return [m for m in metrics if "loss/total" in m], weights

    plain_metrics, plain_weights = train(tmp_path / "plain")
    switches = {
        "gradient_checkpointing": 2,
        "compile_blocks": True,
        "fuse_t2i_passes": True,
        "masked_text_loss": True,
        "prefetch": True,
        "uint8_pixels": True,
        "teacher_inputs_in_workers": True,
        "compile_text_encoder": True,
        "pad_narrow_heads": True,
    }
    overrides = [item for key, value in switches.items() for item in (f"--speed.{key}", str(value))]
    fast_metrics, fast_weights = train(tmp_path / "fast", *overrides)
    assert len(plain_metrics) == len(fast_metrics) == 3
    for plain, fast in zip(plain_metrics, fast_metrics, strict=True):
        for key in (key for key in plain if key.startswith("loss/")):
            assert fast[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-5), key
    for name, value in plain_weights.items():
        torch.testing.assert_close(fast_weights[name], value, rtol=1e-3, atol=1e-4, msg=name)
