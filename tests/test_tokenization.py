"""Text-stream tokenization: fixed length, EOS padding, FrozenT5 parity, question prefixes and truncation, and one
contract for training and inference."""

import pytest
import torch
from transformers import AutoTokenizer

from unialignment.data.collate import Collator
from unialignment.data.dataset import Sample
from unialignment.data.records import TaskKind
from unialignment.frozen.text_encoder import FrozenT5, load_t5_tokenizer, tokenize_captions
from unialignment.toy.components import make_tiny_components, make_tiny_pipeline
from unialignment.toy.t5 import caption_corpus, make_tiny_t5

# Words of the tiny tokenizer's corpus, so that nothing decodes to <unk> (it has no capital I or "?").
QUESTION = "is there a red circle on the left of the image"
ANSWER = "There is one red circle on the left."
LONG_ANSWER = "A small red glass circle on the left of the image. " * 40


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return FrozenT5.from_pretrained(*make_tiny_t5(tmp_path_factory.mktemp("tiny_t5")))


@pytest.fixture(scope="module")
def tokenizer(t5):
    return t5.tokenizer


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_plain_captions_match_frozen_t5(t5, tokenizer):
    captions = [*caption_corpus()[:5], LONG_ANSWER, " ", ""]
    tokens = tokenize_captions(tokenizer, captions)
    expected = t5.tokenize(captions)
    assert tokens.input_ids.shape == (len(captions), t5.max_length) and tokens.input_ids.dtype == torch.long
    assert torch.equal(tokens.input_ids, expected.input_ids)
    assert torch.equal(tokens.attention_mask, expected.attention_mask)
    assert tokens.num_truncated == expected.num_truncated == 1
    # The reference scores every position of a plain caption, EOS padding included.
    assert tokens.score_mask.dtype == torch.bool and tokens.score_mask.all()
    # An empty question is a plain caption.
    assert torch.equal(tokenize_captions(tokenizer, captions, [""] * len(captions)).input_ids, expected.input_ids)


@pytest.mark.parametrize("max_length", [16, 64, 256])
def test_fixed_length_and_eos_padding(tokenizer, max_length):
    tokens = tokenize_captions(tokenizer, [ANSWER, LONG_ANSWER], [QUESTION, ""], max_length=max_length)
    for field in (tokens.input_ids, tokens.attention_mask, tokens.score_mask):
        assert field.shape == (2, max_length)
    num_real = tokens.attention_mask.sum(1)  # question + answer + the closing EOS
    for row in range(2):
        assert tokens.input_ids[row, num_real[row] - 1] == tokenizer.eos_token_id
        assert (tokens.input_ids[row, num_real[row] :] == tokenizer.eos_token_id).all()
        assert (tokens.input_ids[row, : num_real[row] - 1] != tokenizer.eos_token_id).all()


def test_question_is_a_clean_prefix(tokenizer):
    question_ids, answer_ids = token_ids(tokenizer, QUESTION), token_ids(tokenizer, ANSWER)
    tokens = tokenize_captions(tokenizer, [ANSWER, ANSWER], [QUESTION, ""], max_length=64)
    sequence = [*question_ids, *answer_ids, tokenizer.eos_token_id]
    assert tokens.input_ids[0, : len(sequence)].tolist() == sequence
    assert tokens.attention_mask[0].sum() == len(sequence)
    assert not tokens.score_mask[0, : len(question_ids)].any()
    assert tokens.score_mask[0, len(question_ids) :].all()
    assert tokens.score_mask[1].all()
    assert tokens.num_truncated == 0
    decoded = tokenizer.decode(tokens.input_ids[0], skip_special_tokens=True)
    assert decoded == f"{QUESTION} {ANSWER}"


def test_long_answer_is_truncated_keeping_eos(tokenizer):
    question_ids = token_ids(tokenizer, QUESTION)
    max_length = 48
    tokens = tokenize_captions(tokenizer, [LONG_ANSWER, ANSWER], [QUESTION, QUESTION], max_length=max_length)
    assert tokens.num_truncated == 1
    assert tokens.attention_mask[0].all()
    assert tokens.input_ids[0, -1] == tokenizer.eos_token_id
    assert tokens.input_ids[0, : len(question_ids)].tolist() == question_ids  # cut from the answer's end
    kept_answer_ids = token_ids(tokenizer, LONG_ANSWER)[: max_length - 1 - len(question_ids)]
    assert tokens.input_ids[0, len(question_ids) : -1].tolist() == kept_answer_ids


def test_long_question_is_truncated_leaving_an_answer_token(tokenizer):
    long_question = " ".join([QUESTION] * 10)
    max_length = 16
    tokens = tokenize_captions(tokenizer, [ANSWER], [long_question], max_length=max_length)
    assert tokens.num_truncated == 1
    assert tokens.input_ids[0, : max_length - 2].tolist() == token_ids(tokenizer, long_question)[: max_length - 2]
    assert tokens.input_ids[0, -2] == token_ids(tokenizer, ANSWER)[0]
    assert tokens.input_ids[0, -1] == tokenizer.eos_token_id
    assert tokens.score_mask[0].tolist() == [False] * (max_length - 2) + [True, True]


def test_unicode_text(t5, tokenizer):
    captions = ["Ein grüner Kreis — 圆形 🎨 naïve café", "ÅÄÖ\tmixed\nwhitespace  "]
    tokens = tokenize_captions(tokenizer, captions, ["qu'est-ce que c'est ? ünïcödé", ""], max_length=48)
    assert tokens.input_ids.shape == (2, 48)
    assert (tokens.input_ids.gather(1, tokens.attention_mask.sum(1, keepdim=True) - 1) == t5.eos_token_id).all()
    assert torch.equal(tokenize_captions(tokenizer, captions).input_ids, t5.tokenize(captions).input_ids)


def test_pad_must_be_eos(t5, tokenizer):
    pad_is_not_eos = AutoTokenizer.from_pretrained(tokenizer.name_or_path, local_files_only=True)
    assert pad_is_not_eos.pad_token_id != pad_is_not_eos.eos_token_id
    with pytest.raises(ValueError, match="load_t5_tokenizer"):
        tokenize_captions(pad_is_not_eos, [ANSWER])


def test_one_question_per_caption(tokenizer):
    with pytest.raises(ValueError, match="2 questions for 1 captions"):
        tokenize_captions(tokenizer, [ANSWER], [QUESTION, QUESTION])


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    return make_tiny_components(tmp_path_factory.mktemp("components"))


@pytest.mark.parametrize("length", [8, 20, 64, 256])
def test_training_and_inference_tokenize_prompts_alike(tiny_folders, length):
    """The ids training's collator gives a prompt are the ids the pipeline feeds T5 for it, at every length."""
    prompts = [*caption_corpus()[:3], LONG_ANSWER, "ünïcødé ✓"]
    texts = [" "] * len(prompts) + prompts  # guidance encodes the null prompt " " first, then the prompts
    tokenizer = load_t5_tokenizer(tiny_folders.tokenizer, max_length=length)
    samples = [
        Sample(TaskKind.TEXT_TO_IMAGE, 0, 0, torch.zeros(3, 8, 8), [], None, text, text, "", "x", ("x", row), 0, 0)
        for row, text in enumerate(texts)
    ]
    training_ids = Collator(tokenizer, length)(samples).prompt_ids

    pipe = make_tiny_pipeline(tiny_folders, length)
    seen = []
    pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    pipe.text_to_image(prompts, height=16, width=16, num_inference_steps=1, guidance_scale=2.0, output_type="latent")
    # The null prompt is encoded once per pipeline (one row, then cached), the prompts in one call.
    null_ids, prompt_ids = seen
    inference_ids = torch.cat([null_ids.expand(len(prompts), -1), prompt_ids])
    assert inference_ids.shape == (len(texts), length)
    assert torch.equal(inference_ids, training_ids)


def test_building_frozen_t5_leaves_the_tokenizer_alone(t5):
    """The text length is a setting of FrozenT5 (and of the loader that records it), not a side effect on a tokenizer
    that others share."""
    before = t5.tokenizer.model_max_length
    short = FrozenT5(t5.tokenizer, t5.encoder, max_length=7)
    assert t5.tokenizer.model_max_length == before
    assert short.tokenize(["a red circle on the left"]).input_ids.shape == (1, 7)
