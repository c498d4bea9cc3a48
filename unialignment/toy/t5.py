"""Tiny real T5 tokenizer and encoder, built locally in a second or two, and a short masked-token pretraining of
the encoder on a dataset's texts (the objective of BERT, Devlin et al. 2019, with T5's first sentinel as the mask).

The tokenizer is a sentencepiece unigram model trained on captions of coloured shapes, turned into a
T5 tokenizer by transformers' own sentencepiece converter: ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>`
and the 100 sentinels `<extra_id_99>` ... `<extra_id_0>` come last, so `<extra_id_0>` has the highest
id, as in T5.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
import torch.nn.functional as F
from sentencepiece import sentencepiece_model_pb2
from tqdm.auto import tqdm
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from unialignment.frozen.text_encoder import load_t5_tokenizer, mask_token_id

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey", "brown"]
COLOURS += ["cyan", "magenta", "teal", "gold", "silver", "violet", "navy", "olive", "crimson"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "hexagon", "cube", "sphere", "cone", "ring", "oval"]
SHAPES += ["rectangle", "diamond", "pentagon", "cylinder", "pyramid", "arrow", "cross", "crescent", "spiral"]
SIZES = ["small", "large", "tiny", "big", "huge", "medium"]
MATERIALS = ["glass", "metal", "plastic", "paper", "wooden", "stone", "felt", "shiny", "matte"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "in a corner", "near the edge"]
SCENES = ["on a wooden table", "against a plain background", "floating in the sky", "under a bright lamp"]
SCENES += ["lying on the grass", "resting on a shelf", "hanging from a string"]
COUNTS = ["two", "three", "four", "five", "six", "several", "many"]


def caption_corpus() -> list[str]:
    """Simple English captions about coloured shapes (1200 of them, ~150 distinct words), deterministic."""

    def pick(words: list[str], k: int) -> str:
        return words[k % len(words)]

    captions = []
    for k, (colour, shape) in enumerate(itertools.product(COLOURS, SHAPES)):
        size, material, place = pick(SIZES, k), pick(MATERIALS, k), pick(PLACES, k)
        scene, count = pick(SCENES, k // 3), pick(COUNTS, k // 2)
        # A second colour and shape, cycled differently, so that word pairs vary.
        other_colour, other_shape = pick(COLOURS, 7 * k + 3), pick(SHAPES, 11 * k + 5)
        captions.append(f"A {size} {colour} {material} {shape} {place} of the image, {scene}.")
        captions.append(f"{count.capitalize()} {colour} {shape}s next to a {other_colour} {other_shape}.")
        captions.append(f"There is one {other_colour} {shape} and {count} {colour} {other_shape}s {place}.")
    return captions


def make_tiny_t5(
    folder: Path, vocab_size: int = 256, seed: int = 0, corpus: list[str] | None = None, model_type: str = "unigram"
) -> tuple[Path, Path]:
    """Build and save a tiny T5 tokenizer, trained on `corpus` (default: `caption_corpus()`), and encoder;
    returns (tokenizer folder, encoder folder). With the unigram model a small corpus gives a small vocabulary
    (the trainer stops at the pieces it can justify). On a corpus of a few dozen words repeated in templates the
    unigram trainer splits common words ("the", "and") into letters; `model_type="bpe"` keeps them whole (see
    `_as_fewest_pieces_unigram` for how its pieces reach T5's unigram-only tokenizer)."""
    tokenizer_dir, encoder_dir = folder / "tokenizer", folder / "text_encoder"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)

    # T5's sentencepiece layout: pad 0, eos 1, unk 2, no bos. The default corpus has ~150 distinct words,
    # which caps the unigram vocabulary near 150 pieces; `hard_vocab_limit=False` lets the trainer stop there.
    spm_model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus() if corpus is None else corpus),
        model_writer=spm_model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    # transformers 5 has one T5Tokenizer (tokenizers backend). Its constructor ignores `vocab_file`
    # and would silently build a 104-token placeholder vocabulary; `from_pretrained` on a folder holding
    # `spiece.model` runs the real converter, which appends the 100 sentinel tokens. The folder then
    # gets `tokenizer.json` too, the same layout as SD3's `tokenizer_3`.
    proto = spm_model.getvalue() if model_type == "unigram" else _as_fewest_pieces_unigram(spm_model.getvalue())
    (tokenizer_dir / "spiece.model").write_bytes(proto)
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir, extra_ids=100)
    tokenizer.save_pretrained(tokenizer_dir)

    config = T5Config(
        # T5 rounds its embedding table up (32128 rows for 32100 tokens); so do we, to a multiple of 64.
        vocab_size=-(-len(tokenizer) // 64) * 64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    # Seeded init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    encoder.save_pretrained(encoder_dir)
    return tokenizer_dir, encoder_dir


def _as_fewest_pieces_unigram(bpe_model: bytes) -> bytes:
    """A sentencepiece BPE model rewritten as a unigram model over the same pieces, every piece scored -1.

    T5's tokenizer is unigram only: transformers reads the pieces of any `spiece.model` with their scores as
    unigram log-probabilities. BPE scores are merge ranks, so read that way they favour short early pieces and
    split "the" into "t" + "he", which scatters a word over several positions of the text stream. Equal scores
    make the Viterbi segmentation the one with the fewest pieces: every word the BPE merged whole is one token.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(bpe_model)
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    for piece in proto.pieces:
        if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL:
            piece.score = -1.0
    return proto.SerializeToString()


@dataclass
class T5PretrainingReport:
    steps: int
    first_loss: float  # masked-token cross-entropy (nats) of the first batch
    last_loss: float  # mean over the last tenth of the steps


def pretrain_tiny_t5(
    tokenizer_dir: Path,
    encoder_dir: Path,
    texts: list[str],
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> T5PretrainingReport:
    """Teach the saved tiny encoder to fill masked tokens of `texts` in place, then save it over itself.

    Why: the text stream sees its noisy caption only through the frozen T5 encoder, and T5 knows positions only
    through its relative attention biases. A random tiny T5 has weak biases and random features, so every masked
    position of a caption encodes to nearly the same state and the transformer writes a bag of the right words in
    no order. A pretrained T5 (the real one saw C4) encodes a masked position by its neighbours. This gives the
    tiny one the same kind of knowledge of its texts: each text is padded with `</s>` to the longest (the padding
    the text stream sees), a fraction t ~ U(0, 1) of its tokens becomes `<extra_id_0>` (the text stream's mask
    token and masking schedule), and the encoder plus a throwaway linear head predict the masked tokens.
    """
    tokenizer = load_t5_tokenizer(tokenizer_dir)
    mask_id = mask_token_id(tokenizer)
    distinct = sorted(set(texts))  # frequencies matter less here than covering every text
    ids = tokenizer(distinct, padding="longest", return_tensors="pt")["input_ids"]
    encoder = T5EncoderModel.from_pretrained(encoder_dir)
    encoder.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(encoder.config.d_model, encoder.config.vocab_size)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(steps), desc="T5 masked tokens", leave=False):
        batch = ids[torch.randint(len(ids), (batch_size,), generator=generator)]
        rate = torch.rand(batch_size, 1, generator=generator)
        masked = torch.rand(batch.shape, generator=generator) < rate
        masked[:, 0] |= ~masked.any(dim=1)  # at least one target per text
        logits = head(encoder(torch.where(masked, mask_id, batch)).last_hidden_state)
        loss = F.cross_entropy(logits[masked], batch[masked])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    encoder.eval()
    encoder.save_pretrained(encoder_dir)
    tail = losses[-max(1, steps // 10) :]
    return T5PretrainingReport(steps, losses[0], sum(tail) / len(tail))
