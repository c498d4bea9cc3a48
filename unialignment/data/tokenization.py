"""Fixed-length T5 token ids for the text stream, with a mask of the tokens it noises and scores (SPEC 4).

A plain caption is tokenized exactly as `FrozenT5.tokenize` does (caption + `</s>`, padded with `</s>` to
`max_length`) and every position is scored, padding included, as in the reference. A question-answer record is
question tokens (without the `</s>` the tokenizer would append) followed by answer + `</s>` + padding; the
question is the clean prompt of the prompted MDLM variant, so only the answer and what follows it is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from unialignment.frozen.text_encoder import MAX_TEXT_LENGTH


@dataclass
class TokenizedCaptions:
    input_ids: torch.Tensor  # (B, L) long, padded with EOS
    attention_mask: torch.Tensor  # (B, L) long, 1 on question, answer and the first EOS
    score_mask: torch.Tensor  # (B, L) bool, True on the tokens the text stream noises and scores
    num_truncated: int  # how many sequences were cut to fit L tokens


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    questions: list[str] | None = None,
    max_length: int = MAX_TEXT_LENGTH,
) -> TokenizedCaptions:
    """Tokenize captions (answers), each optionally after a question, into (B, max_length) ids and masks.

    Truncation cuts the answer from the end and keeps the closing EOS. A question longer than max_length - 2
    tokens is cut too, so that at least one answer token and the EOS remain. An empty question means a plain
    caption.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None or tokenizer.pad_token_id != eos_id:
        raise ValueError("The pad token must be the EOS token `</s>` (T5 convention); load with load_t5_tokenizer.")
    if max_length < 2:
        raise ValueError(f"max_length must leave room for an answer token and the EOS, got {max_length}.")
    if questions is None:
        questions = [""] * len(captions)
    if len(questions) != len(captions):
        raise ValueError(f"got {len(questions)} questions for {len(captions)} captions; pass one per caption.")

    # Both in one batched call each (the fast tokenizer's Rust loop); EOS is appended by hand below.
    answer_ids = tokenizer(captions, add_special_tokens=False)["input_ids"] if captions else []
    question_ids = tokenizer(questions, add_special_tokens=False)["input_ids"] if any(questions) else None

    # One numpy buffer filled row by row: much faster than torch.tensor on a list of padded lists.
    input_ids = np.full((len(captions), max_length), eos_id, dtype=np.int64)
    sequence_lengths = np.zeros(len(captions), dtype=np.int64)
    question_lengths = np.zeros(len(captions), dtype=np.int64)
    num_truncated = 0
    for row, answer in enumerate(answer_ids):
        question = question_ids[row] if question_ids is not None else []
        kept_question = question[: max_length - 2]
        kept_answer = answer[: max_length - 1 - len(kept_question)]
        num_truncated += len(kept_question) < len(question) or len(kept_answer) < len(answer)
        sequence = [*kept_question, *kept_answer, eos_id]
        input_ids[row, : len(sequence)] = sequence
        sequence_lengths[row] = len(sequence)
        question_lengths[row] = len(kept_question)

    positions = torch.arange(max_length)  # (L,)
    attention_mask = (positions < torch.from_numpy(sequence_lengths).unsqueeze(1)).long()  # (B, L)
    score_mask = positions >= torch.from_numpy(question_lengths).unsqueeze(1)  # (B, L)
    return TokenizedCaptions(torch.from_numpy(input_ids), attention_mask, score_mask, num_truncated)
