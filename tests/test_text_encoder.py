"""Frozen T5: pad = EOS, the mask token, fixed-length tokenization, the mask embedding, the null prompt."""

import re

import pytest
import sentencepiece
import torch
from transformers import T5Tokenizer

from unialignment.frozen.text_encoder import (
    MASK_TOKEN,
    MAX_TEXT_LENGTH,
    FrozenT5,
    load_mask_embedding,
    load_t5_tokenizer,
    mask_token_id,
)
from unialignment.toy.t5 import caption_corpus, make_tiny_t5

D_MODEL = 32  # unialignment/toy/t5.py


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def t5(t5_folders):
    return FrozenT5.from_pretrained(*t5_folders)


def test_tiny_tokenizer_matches_its_sentencepiece_model(t5_folders, t5):
    """The transformers conversion kept the sentencepiece vocabulary and appended `</s>`, as T5 does."""
    sentencepiece_model = sentencepiece.SentencePieceProcessor(model_file=str(t5_folders[0] / "spiece.model"))
    for caption in [*caption_corpus()[:20], "A Purple ZEBRA,  with   odd spacing", " "]:
        assert t5.tokenizer(caption).input_ids == [*sentencepiece_model.encode(caption), t5.eos_token_id]
    assert 200 <= t5.vocab_size <= 400


def test_pad_token_is_eos(t5_folders, t5):
    tokenizer = load_t5_tokenizer(t5_folders[0])
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert t5.pad_token_id == t5.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")


def test_mask_token_is_extra_id_0(t5):
    tokenizer = t5.tokenizer
    assert t5.mask_token_id == tokenizer.convert_tokens_to_ids(MASK_TOKEN) != tokenizer.unk_token_id
    # As in T5 (32099 of 32100), the first sentinel has the highest id.
    assert t5.mask_token_id == len(tokenizer) - 1 == t5.vocab_size - 1
    assert t5.encoder.config.vocab_size >= t5.vocab_size


def test_mask_token_lookup_fails_without_sentinels():
    with pytest.raises(ValueError, match=re.escape(MASK_TOKEN)):
        mask_token_id(T5Tokenizer(extra_ids=0))


def test_tokenize_pads_to_max_length_and_counts_truncation(t5):
    short_ids = t5.tokenizer("a red circle").input_ids  # ends with </s>
    tokens = t5.tokenize(["a red circle", "a blue star " * 200, " "])
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (3, MAX_TEXT_LENGTH)
    assert tokens.input_ids.dtype == torch.long
    assert tokens.num_truncated == 1
    assert tokens.input_ids[0, : len(short_ids)].tolist() == short_ids
    assert (tokens.input_ids[0, len(short_ids) :] == t5.eos_token_id).all()  # padded with EOS
    assert tokens.attention_mask[0].sum() == len(short_ids)
    assert tokens.input_ids[1, -1] == t5.eos_token_id  # truncation keeps the closing EOS
    assert tokens.attention_mask[1].all()


def test_encode_shape_and_frozen(t5):
    hidden_states = t5.encode(["a red circle", "two green cubes"])
    assert hidden_states.shape == (2, MAX_TEXT_LENGTH, D_MODEL)
    assert hidden_states.dtype == t5.dtype == torch.float32
    assert not hidden_states.requires_grad
    assert not t5.encoder.training
    assert not any(parameter.requires_grad for parameter in t5.encoder.parameters())
    assert t5.hidden_size == D_MODEL


@pytest.mark.parametrize("stored_shape", [(D_MODEL,), (1, D_MODEL)])
def test_mask_embedding_replaces_only_the_mask_row(t5_folders, t5, tmp_path, stored_shape):
    mask_embedding = torch.randn(stored_shape)
    path = tmp_path / "mask_token_emb.00-of-01.pth"
    torch.save(mask_embedding, path)

    t5_with_mask = FrozenT5.from_pretrained(*t5_folders, mask_embedding_path=path)

    original = t5.encoder.get_input_embeddings().weight
    replaced = t5_with_mask.encoder.get_input_embeddings().weight
    other_rows = torch.ones(len(original), dtype=torch.bool)
    other_rows[t5.mask_token_id] = False
    assert torch.equal(replaced[t5.mask_token_id], mask_embedding.reshape(D_MODEL))
    assert not torch.equal(original[t5.mask_token_id], replaced[t5.mask_token_id])
    assert torch.equal(replaced[other_rows], original[other_rows])


def test_mask_embedding_with_wrong_shape_names_the_file(tmp_path):
    path = tmp_path / "mask_token_emb.00-of-01.pth"
    torch.save(torch.randn(D_MODEL + 1), path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*\(33,\)"):
        load_mask_embedding(path, D_MODEL)


def test_null_prompt_is_encoded_space_and_cached(t5):
    null_prompt_embeds = t5.null_prompt_embeds()
    assert null_prompt_embeds.shape == (1, MAX_TEXT_LENGTH, D_MODEL)
    assert torch.equal(null_prompt_embeds, t5.encode([" "]))
    assert t5.null_prompt_embeds() is null_prompt_embeds
    assert torch.equal(t5.null_prompt_embeds(batch_size=3), null_prompt_embeds.expand(3, -1, -1))


def test_decode_drops_every_eos_pad_and_mask_token(t5):
    caption_ids = t5.tokenizer("a red circle", add_special_tokens=False).input_ids
    after_eos_ids = t5.tokenizer("two blue stars", add_special_tokens=False).input_ids
    ids = [t5.eos_token_id, *caption_ids[:1], t5.mask_token_id, *caption_ids[1:], t5.mask_token_id, t5.eos_token_id]
    ids += [*after_eos_ids, t5.pad_token_id, t5.pad_token_id]
    # masked diffusion can place an </s> before or between words; the words around it are kept
    assert t5.decode(torch.tensor([ids])) == ["a red circle two blue stars"]
    assert t5.decode(t5.tokenize(["a red circle", " "]).input_ids) == ["a red circle", ""]


def test_missing_folders_and_files_are_named(t5_folders, tmp_path):
    tokenizer_dir, encoder_dir = t5_folders
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_t5_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        FrozenT5.from_pretrained(tokenizer_dir, missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        FrozenT5.from_pretrained(tokenizer_dir, encoder_dir, mask_embedding_path=missing)
