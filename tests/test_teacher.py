"""Alignment teacher: target shapes, batching invariance, the two text averages, frozenness, plug-ins."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from unialignment.frozen.teacher import AlignmentTeacher, QwenVLTeacher
from unialignment.toy.teacher import make_tiny_teacher

DIM = 32  # unialignment/toy/teacher.py: text hidden size = vision out_hidden_size
CAPTIONS = ["a red circle on a wooden table", "two blue squares", "a large green star in the middle"]


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_qwen_vl"))


@pytest.fixture(scope="module")
def teacher(teacher_folder):
    # float32 so that batched and one-by-one image targets agree to tight tolerance.
    return QwenVLTeacher.from_pretrained(teacher_folder, torch_dtype=torch.float32)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def check_targets(teacher: AlignmentTeacher, images: list[Image.Image], texts: list[str]) -> None:
    """What a trainer relies on, for any teacher: (B, dim) float32 targets that carry no gradient."""
    for targets, inputs in [(teacher.image_targets(images), images), (teacher.text_targets(texts), texts)]:
        assert targets.shape == (len(inputs), teacher.dim)
        assert targets.dtype == torch.float32
        assert not targets.requires_grad
        assert torch.isfinite(targets).all()


def test_shapes_and_dtype(teacher):
    assert teacher.dim == DIM
    check_targets(teacher, [random_image(64, 64, seed) for seed in range(3)], CAPTIONS)


def test_bfloat16_teacher_still_returns_float32(teacher_folder):
    teacher = QwenVLTeacher.from_pretrained(teacher_folder)  # default dtype: bfloat16
    assert teacher.model.dtype == torch.bfloat16
    check_targets(teacher, [random_image(64, 64, 0)], CAPTIONS[:1])


def test_batched_image_targets_equal_one_by_one(teacher, monkeypatch):
    # 112x112 spans four 56 px attention windows; 64x64 (resized to 56x56) fits in one.
    images = [random_image(112, 112, 0), random_image(64, 64, 1), random_image(112, 112, 2)]
    vision_calls = []
    get_image_features = teacher.model.get_image_features

    def counted_get_image_features(*args, **kwargs):
        vision_calls.append(args)
        return get_image_features(*args, **kwargs)

    monkeypatch.setattr(teacher.model, "get_image_features", counted_get_image_features)
    batched = teacher.image_targets(images)
    assert len(vision_calls) == 1  # the whole batch goes through the vision tower at once
    one_by_one = torch.cat([teacher.image_targets([image]) for image in images])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[2])  # distinct images, distinct targets


def test_images_of_different_sizes_in_one_batch(teacher):
    images = [random_image(64, 64, 0), random_image(84, 140, 1)]
    image_grid_thw = teacher.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
    assert (image_grid_thw.prod(-1) // 4).tolist() == [4, 15]  # 56x56 and 84x140 px after the processor
    batched = teacher.image_targets(images)
    one_by_one = torch.cat([teacher.image_targets([image]) for image in images])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)


def test_image_size_resizes_before_the_processor(teacher_folder, teacher):
    resizing_teacher = QwenVLTeacher.from_pretrained(teacher_folder, torch_dtype=torch.float32, image_size=56)
    images = [random_image(84, 140, 0), random_image(112, 112, 1)]
    resized = [image.resize((56, 56), Image.Resampling.BICUBIC) for image in images]
    torch.testing.assert_close(resizing_teacher.image_targets(images), teacher.image_targets(resized))


def test_text_targets_real_tokens_only_match_hand_computation(teacher_folder, teacher):
    real_tokens_teacher = QwenVLTeacher.from_pretrained(
        teacher_folder, torch_dtype=torch.float32, average_padding=False
    )
    embedding_table = teacher.model.get_input_embeddings().weight  # (vocab, dim)
    real_token_targets = real_tokens_teacher.text_targets(CAPTIONS)
    reference_targets = teacher.text_targets(CAPTIONS)
    targets = zip(CAPTIONS, real_token_targets, reference_targets, strict=True)
    for caption, real_token_target, reference_target in targets:
        token_ids = teacher.tokenizer(caption)["input_ids"]
        assert 0 < len(token_ids) < teacher.max_text_length
        torch.testing.assert_close(real_token_target, embedding_table[token_ids].mean(0))
        # Reference: the caption padded to max_text_length with the pad token, all positions averaged.
        padded_ids = token_ids + [teacher.tokenizer.pad_token_id] * (teacher.max_text_length - len(token_ids))
        torch.testing.assert_close(reference_target, embedding_table[padded_ids].mean(0))
    assert not torch.allclose(real_token_targets, reference_targets)


def test_the_authors_padding_pads_each_batch_to_its_longest_caption(teacher_folder, teacher):
    """What the authors' code does: pad the batch to its longest caption and average every position, so one
    caption's target depends on the batch it came in."""
    authors = QwenVLTeacher.from_pretrained(teacher_folder, torch_dtype=torch.float32, pad_to="longest_in_batch")
    embedding_table = teacher.model.get_input_embeddings().weight
    ids = [teacher.tokenizer(caption)["input_ids"] for caption in CAPTIONS]
    longest = max(len(token_ids) for token_ids in ids)
    pad = teacher.tokenizer.pad_token_id
    for target, token_ids in zip(authors.text_targets(CAPTIONS), ids, strict=True):
        torch.testing.assert_close(target, embedding_table[token_ids + [pad] * (longest - len(token_ids))].mean(0))
    alone = authors.text_targets(CAPTIONS[:1])[0]
    torch.testing.assert_close(alone, embedding_table[ids[0]].mean(0))  # alone it is its own longest
    assert not torch.allclose(authors.text_targets(CAPTIONS), teacher.text_targets(CAPTIONS))


def test_text_targets_truncate_to_max_text_length(teacher_folder):
    teacher = QwenVLTeacher.from_pretrained(teacher_folder, torch_dtype=torch.float32, max_text_length=4)
    long_caption = " ".join(CAPTIONS)
    token_ids = teacher.tokenizer(long_caption)["input_ids"]
    assert len(token_ids) > 4
    embedding_table = teacher.model.get_input_embeddings().weight
    torch.testing.assert_close(teacher.text_targets([long_caption])[0], embedding_table[token_ids[:4]].mean(0))


def test_teacher_is_frozen(teacher):
    assert all(not parameter.requires_grad for parameter in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training


def test_loads_the_checkpoint_vision_tower_and_embeddings_only(teacher_folder, teacher):
    full_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_folder, dtype=torch.float32)
    assert len(teacher.model.language_model.layers) == 0  # decoder layers are skipped
    # The kept weights come from the checkpoint, not from a fresh init.
    torch.testing.assert_close(
        teacher.model.get_input_embeddings().weight, full_model.get_input_embeddings().weight, rtol=0, atol=0
    )
    full_vision_weights = full_model.model.visual.state_dict()
    for name, weight in teacher.model.visual.state_dict().items():
        torch.testing.assert_close(weight, full_vision_weights[name], rtol=0, atol=0)


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(FileNotFoundError, match="no_such_teacher"):
        QwenVLTeacher.from_pretrained(missing)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="no_such_teacher.*config.json"):
        QwenVLTeacher.from_pretrained(missing)


def test_skipped_decoder_weights_are_not_reported_but_a_missing_weight_is_an_error(teacher_folder, tmp_path, capfd):
    QwenVLTeacher.from_pretrained(teacher_folder, torch_dtype=torch.float32)
    assert "UNEXPECTED" not in capfd.readouterr().err  # the dropped decoder layers are expected

    # the same checkpoint without one vision weight: loading it would leave that weight at a fresh init
    broken = tmp_path / "broken_teacher"
    shutil.copytree(teacher_folder, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(name for name in weights if "visual.patch_embed" in name)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"broken_teacher does not match .*missing \[.*patch_embed"):
        QwenVLTeacher.from_pretrained(broken, torch_dtype=torch.float32)


class FixedTeacher(AlignmentTeacher):
    """A toy teacher: one fixed vector for every image, another for every caption."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.dim = dim
        self.register_buffer("image_vector", torch.ones(dim))
        self.register_buffer("text_vector", torch.arange(dim, dtype=torch.float32))

    @torch.no_grad()
    def image_targets(self, images: list[Image.Image]) -> torch.Tensor:
        return self.image_vector.expand(len(images), -1).clone()

    @torch.no_grad()
    def text_targets(self, texts: list[str]) -> torch.Tensor:
        return self.text_vector.expand(len(texts), -1).clone()


def test_custom_teacher_plugs_into_the_same_interface():
    toy = FixedTeacher()
    check_targets(toy, [random_image(32, 32, 0)] * 2, CAPTIONS)
    toy.train()
    assert not toy.training


def test_alignment_teacher_is_abstract():
    with pytest.raises(TypeError):
        AlignmentTeacher()
