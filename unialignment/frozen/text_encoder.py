"""Frozen T5 text encoder and tokenizer.

The text encoder is the T5 v1.1 XXL encoder that Stable Diffusion 3 uses as its third text encoder
(Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis";
`text_encoder_3` / `tokenizer_3` in the diffusers layout). As in SD3's reference training, the pad
token is the EOS token `</s>` and every caption is truncated and padded to 256 tokens.

The text stream is a masked (absorbing-state) diffusion in the style of MDLM (Sahoo et al. 2024):
its mask token is T5's first sentinel `<extra_id_0>`, whose input-embedding row can be replaced at
load time by a learned mask embedding.

Every text either stream sees is tokenized by `tokenize_captions`: training's prompts and captions, the
pipeline's prompts and the caption sampler's questions, so the same text gives the same ids everywhere. A plain
text is its tokens, `</s>`, then `</s>` padding to the fixed length, and every position is scored, padding
included, as in the reference. A question-answer text is the question's tokens (without the `</s>` the tokenizer
would append) followed by answer + `</s>` + padding; the question is the clean prompt of the prompted MDLM
variant, so only the answer and what follows it is scored.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from unialignment.errors import UserError
from unialignment.frozen.random_weights import build_with_random_weights

MASK_TOKEN = "<extra_id_0>"
MASK_EMBEDDING_FILE = "mask_token_emb.00-of-01.pth"  # the authors' learned mask-token embedding, in a pipeline folder
MAX_TEXT_LENGTH = 256


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def load_t5_tokenizer(path: str | Path, max_length: int | None = None) -> PreTrainedTokenizerBase:
    """Load a T5 tokenizer from a local folder and make its pad token the EOS token `</s>`.

    `max_length`, when given, is recorded as the tokenizer's `model_max_length`: the length a pipeline built with
    this tokenizer (and saved with it) pads prompts to, so that it encodes them as training did."""
    path = _require_dir(path, "T5 tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer in {path} has no EOS token; a T5 tokenizer has `</s>`.")
    # SD3's reference training pads T5 input with EOS, so padding positions encode as `</s>`.
    tokenizer.pad_token = tokenizer.eos_token
    if max_length is not None:
        tokenizer.model_max_length = max_length
    return tokenizer


def text_length_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The prompt length a tokenizer records: 256 as in SD3 and in training, or `model_max_length` when that is
    shorter (SD3's tokenizer says 512, tokenizers without a limit say ~1e30, so the 256 cap decides for both)."""
    return min(MAX_TEXT_LENGTH, tokenizer.model_max_length)


def mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of the mask token `<extra_id_0>` (32099 in SD3's tokenizer), looked up in `tokenizer`."""
    token_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"The tokenizer has no {MASK_TOKEN} token (the mask token); a T5 tokenizer with its "
            "sentinel tokens (extra_ids) is required."
        )
    return token_id


def load_mask_embedding(path: str | Path, expected_dim: int) -> torch.Tensor:
    """Load a learned mask-token embedding (authors' file: `mask_token_emb.00-of-01.pth`).

    The file holds a tensor of shape (expected_dim,) or (1, expected_dim); returns shape (expected_dim,).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask-token embedding file not found: {path}")
    try:
        mask_embedding = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        # weights_only refuses anything but tensors and plain values: a pickle that would run code lands here.
        # torch's message advises weights_only=False, which is the one thing not to do here: keep its reason only.
        advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(error).replace("WeightsUnpickler error:", "\n").splitlines()]
        reason = next((line for line in lines if line and not line.startswith(advice)), type(error).__name__)[:200]
        raise UserError(f"{path} is not a tensor file that loads safely (it was not loaded): {reason}") from None
    if not isinstance(mask_embedding, torch.Tensor):
        raise UserError(f"{path} must hold a tensor, found {type(mask_embedding).__name__}.")
    if tuple(mask_embedding.shape) not in {(expected_dim,), (1, expected_dim)}:
        raise UserError(
            f"{path} holds a tensor of shape {tuple(mask_embedding.shape)}; expected ({expected_dim},) "
            f"or (1, {expected_dim}) to match the text encoder's hidden size."
        )
    return mask_embedding.reshape(expected_dim)


def apply_mask_embedding(
    encoder: T5EncoderModel, tokenizer: PreTrainedTokenizerBase, mask_embedding_path: str | Path
) -> None:
    """Write the learned mask embedding of `mask_embedding_path` into the mask token's row of T5's input
    embeddings (`load_mask_embedding` checks the file)."""
    mask_embedding = load_mask_embedding(mask_embedding_path, encoder.config.d_model)
    embedding_weight = encoder.get_input_embeddings().weight  # (vocab, d_model)
    with torch.no_grad():
        embedding_weight[mask_token_id(tokenizer)] = mask_embedding.to(embedding_weight.dtype)


@dataclass
class TokenizedText:
    input_ids: torch.Tensor  # (B, L) long, padded with EOS
    attention_mask: torch.Tensor  # (B, L) long, 1 on question, answer and the first EOS
    score_mask: torch.Tensor  # (B, L) bool, True on the tokens the text stream noises and scores
    num_truncated: int  # how many sequences were cut to fit L tokens


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase,
    captions: list[str],
    questions: list[str] | None = None,
    max_length: int = MAX_TEXT_LENGTH,
) -> TokenizedText:
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
    return TokenizedText(torch.from_numpy(input_ids), attention_mask, score_mask, num_truncated)


# A plain class, not an nn.Module: a frozen component must never show up in a trainer's
# `.parameters()`, `state_dict()`, optimizer or DDP wrapper, and a plain attribute keeps it out.
class FrozenT5:
    """T5 tokenizer and frozen T5 encoder, with the mask token and the null prompt."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        encoder: T5EncoderModel,
        max_length: int = MAX_TEXT_LENGTH,
    ):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length
        self._mask_token_id = mask_token_id(tokenizer)
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            raise ValueError("The pad token must be the EOS token `</s>`; load with load_t5_tokenizer.")
        if len(tokenizer) > encoder.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the encoder embeds only "
                f"{encoder.config.vocab_size}; they do not belong together."
            )
        self._null_prompt_embeds: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        tokenizer_path: str | Path,
        encoder_path: str | Path,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        mask_embedding_path: str | Path | None = None,
        max_length: int | None = MAX_TEXT_LENGTH,
        random_weights: bool = False,
    ) -> FrozenT5:
        """`max_length` None takes the length the tokenizer folder records (`text_length_of`); a length is recorded
        in the tokenizer (`load_t5_tokenizer`). `random_weights`: the encoder folder holds only its config, and the
        weights are drawn at random on `device` (benchmarks)."""
        tokenizer = load_t5_tokenizer(tokenizer_path, max_length)
        encoder_path = _require_dir(encoder_path, "T5 encoder")
        if random_weights:
            config = AutoConfig.from_pretrained(encoder_path, local_files_only=True)
            encoder = build_with_random_weights(lambda: T5EncoderModel._from_config(config), device, torch_dtype)
        else:
            encoder = T5EncoderModel.from_pretrained(encoder_path, dtype=torch_dtype, local_files_only=True)
        if mask_embedding_path is not None:
            apply_mask_embedding(encoder, tokenizer, mask_embedding_path)
        length = text_length_of(tokenizer) if max_length is None else max_length
        return cls(tokenizer, encoder.to(device), max_length=length)

    @property
    def mask_token_id(self) -> int:
        return self._mask_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce: the size of the transformer's text head."""
        return len(self.tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.d_model

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def tokenize(self, texts: list[str]) -> TokenizedText:
        """Tokenize, truncate and pad to exactly `max_length` tokens (EOS is kept when truncating)."""
        return tokenize_captions(self.tokenizer, texts, max_length=self.max_length)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Encode token ids (B, L) into hidden states (B, L, d_model) in the encoder's dtype.

        No attention mask, as SD3's pipeline encodes T5: padding is EOS and is attended to.
        """
        return self.encoder(input_ids.to(self.device)).last_hidden_state

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Encode texts into hidden states (B, max_length, d_model)."""
        return self.encode_ids(self.tokenize(texts).input_ids)

    def null_prompt_embeds(self, batch_size: int = 1) -> torch.Tensor:
        """Encoding of `" "` (B, max_length, d_model): the condition-dropout and default negative prompt.

        Computed once and cached; batch_size > 1 returns an expanded view of the cached tensor.
        """
        if self._null_prompt_embeds is None:
            self._null_prompt_embeds = self.encode([" "])
        if batch_size == 1:
            return self._null_prompt_embeds
        return self._null_prompt_embeds.expand(batch_size, -1, -1)

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Decode token ids (B, L) into texts without `</s>`, padding and mask tokens, wherever they stand.

        docs/METHOD.md section 4 decodes "without `</s>` and padding"; a sampled text can hold an `</s>` between words
        (masked diffusion fills positions in any order), and the words after it are part of the sample, so every
        `</s>` is dropped rather than the text cut at the first one."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1, ids.shape[-1]).tolist()
        dropped = {self.eos_token_id, self.pad_token_id, self.mask_token_id}
        texts = []
        for row in ids:
            row = [token_id for token_id in row if token_id not in dropped]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts
