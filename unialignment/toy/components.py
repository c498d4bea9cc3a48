"""The tiny frozen components (T5, VAE, teacher) built into one folder, each loadable with `from_pretrained`
through the same code as the full-size ones."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from PIL import Image
from transformers import AutoTokenizer, T5EncoderModel

from unialignment.files import atomic_folder
from unialignment.frozen.components import ComponentsConfig, FrozenComponents, load_frozen_components
from unialignment.frozen.text_encoder import load_t5_tokenizer
from unialignment.pipelines import UniAlignmentPipeline
from unialignment.toy.folder import SPLITS, images_of, read_split, texts_of
from unialignment.toy.t5 import T5PretrainingReport, make_tiny_t5, pretrain_tiny_t5
from unialignment.toy.teacher import TeacherPretrainingReport, make_tiny_teacher, pretrain_tiny_teacher
from unialignment.toy.transformer import make_tiny_transformer
from unialignment.toy.vae import TINY_VAE_CONFIG, VAETrainingReport, images_to_tensor, make_tiny_vae, train_vae


@dataclass
class TinyComponentFolders:
    tokenizer: Path
    text_encoder: Path
    vae: Path
    teacher: Path


def make_tiny_components(folder: Path) -> TinyComponentFolders:
    """Build every tiny frozen component under `folder`; an already built folder is reused."""
    folder = Path(folder)
    folders = TinyComponentFolders(folder / "tokenizer", folder / "text_encoder", folder / "vae", folder / "teacher")
    if not (folders.text_encoder / "config.json").is_file():
        make_tiny_t5(folder)
    if not (folders.vae / "config.json").is_file():
        make_tiny_vae(folders.vae)
    if not (folders.teacher / "config.json").is_file():
        make_tiny_teacher(folders.teacher)
    return folders


def tiny_components_config(folders: TinyComponentFolders, max_text_length: int = 32) -> ComponentsConfig:
    """The components settings of the tiny folders, in float32."""
    return ComponentsConfig(
        tokenizer=str(folders.tokenizer),
        text_encoder=str(folders.text_encoder),
        vae=str(folders.vae),
        teacher=str(folders.teacher),
        text_length=max_text_length,
        dtype="float32",
    )


def load_tiny_components(folders: TinyComponentFolders, max_text_length: int = 32) -> FrozenComponents:
    """The tiny components through the loader every full-size run uses."""
    return load_frozen_components(tiny_components_config(folders, max_text_length))


def make_tiny_pipeline(folders: TinyComponentFolders, max_text_length: int, seed: int = 0) -> UniAlignmentPipeline:
    """The tiny T5 and VAE from their folders with a fresh tiny transformer sized to them (`make_tiny_transformer`,
    seeded), as one pipeline with its progress bars off."""
    tokenizer = load_t5_tokenizer(folders.tokenizer, max_text_length)
    text_encoder = T5EncoderModel.from_pretrained(folders.text_encoder)
    vae = AutoencoderKL.from_pretrained(folders.vae)
    transformer = make_tiny_transformer(
        seed,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        joint_attention_dim=text_encoder.config.d_model,
        vocab_size=len(tokenizer),
    )
    pipe = UniAlignmentPipeline(transformer, FlowMatchEulerDiscreteScheduler(), vae, text_encoder, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class DatasetComponentsReport:
    vocab_size: int  # len(tokenizer)
    image_size: int
    t5: T5PretrainingReport | None  # None when an existing encoder folder was reused
    vae: VAETrainingReport | None  # None when an existing VAE folder was reused
    teacher: TeacherPretrainingReport | None  # None when an existing teacher folder was reused


def make_dataset_components(
    data_root: Path,
    folder: Path,
    vae_max_steps: int = 2000,
    vae_target_psnr: float = 31.0,
    t5_steps: int = 400,
    teacher_steps: int = 2000,
    seed: int = 0,
) -> tuple[TinyComponentFolders, DatasetComponentsReport]:
    """Tiny frozen components fitted to one dataset folder (`unialignment.toy.folder` layout): a T5 tokenizer
    trained on every text of both splits (so held-out prompts tokenise without unknown pieces), a tiny T5 encoder
    over it pretrained for `t5_steps` steps to fill masked tokens of those texts (`pretrain_tiny_t5`), a tiny VAE
    trained on the training split's images until it reconstructs them, and a tiny Qwen2.5-VL teacher trained for
    `teacher_steps` steps to match the training split's images with their captions (`pretrain_tiny_teacher`, which
    also scores it on the held-out pairs; its text targets padded to `dataset_text_length`, as the demo's trainer
    computes them). A component whose folder
    already exists is reused, so a second run costs nothing."""
    folder = Path(folder)
    folders = TinyComponentFolders(folder / "tokenizer", folder / "text_encoder", folder / "vae", folder / "teacher")
    train, heldout = read_split(data_root, "train"), read_split(data_root, "heldout")
    train_records = [record for records in train.values() for record in records]
    image_paths = images_of(train_records)
    image_size = _common_side(image_paths)

    every_record = train_records + [record for records in heldout.values() for record in records]
    # every text with its repeats: word frequencies are what the tokenizer trainers learn pieces from
    corpus = texts_of(every_record)
    t5_report = None
    if not (folders.text_encoder / "config.json").is_file():
        t5_report = _build_t5(folders, corpus, t5_steps, seed)
    vae_report = None
    if not (folders.vae / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": image_size})
        pixels = images_to_tensor([Image.open(path) for path in image_paths], image_size)
        vae_report = train_vae(vae, pixels, max_steps=vae_max_steps, target_psnr=vae_target_psnr, seed=seed)
        with atomic_folder(folders.vae) as building:
            vae.save_pretrained(building)
    teacher_report = None
    if not (folders.teacher / "config.json").is_file():
        # built and trained beside its place and moved there when done, as the T5 pair is: an interrupted run leaves
        # no half-trained component for the next run to reuse
        with atomic_folder(folders.teacher) as building:
            make_tiny_teacher(building, seed=seed, corpus=corpus)
            pairs = [(r.target_image, r.caption) for r in train_records if r.caption and not r.question]
            if teacher_steps > 0 and pairs:
                images, captions = zip(*pairs, strict=True)
                text_length = _text_length(every_record, load_t5_tokenizer(folders.tokenizer))
                heldout_records = [record for records in heldout.values() for record in records]
                heldout_pairs = [(r.target_image, r.caption) for r in heldout_records if r.caption and not r.question]
                teacher_report = pretrain_tiny_teacher(
                    building,
                    list(images),
                    list(captions),
                    steps=teacher_steps,
                    text_length=text_length,
                    seed=seed,
                    heldout=([i for i, _ in heldout_pairs], [c for _, c in heldout_pairs]) if heldout_pairs else None,
                )
    vocab_size = len(AutoTokenizer.from_pretrained(folders.tokenizer))
    return folders, DatasetComponentsReport(vocab_size, image_size, t5_report, vae_report, teacher_report)


def _build_t5(folders: TinyComponentFolders, corpus: list[str], steps: int, seed: int) -> T5PretrainingReport | None:
    """The T5 tokenizer and encoder built and pretrained in a temporary folder beside them, then moved into place,
    the encoder last: its config is what says the pair is complete."""
    building = folders.text_encoder.parent / f".t5.tmp-{os.getpid()}"
    try:
        make_tiny_t5(building, corpus=corpus, seed=seed, model_type="bpe")
        report = None
        if steps > 0:
            report = pretrain_tiny_t5(building / "tokenizer", building / "text_encoder", corpus, steps=steps, seed=seed)
        shutil.rmtree(folders.tokenizer, ignore_errors=True)
        os.replace(building / "tokenizer", folders.tokenizer)
        os.replace(building / "text_encoder", folders.text_encoder)
        return report
    finally:
        shutil.rmtree(building, ignore_errors=True)


def dataset_image_size(data_root: Path) -> int:
    """The side most training images of a dataset folder have; the demo trains and samples square at that size."""
    records = [record for records in read_split(data_root, "train").values() for record in records]
    return _common_side(images_of(records))


def dataset_text_length(data_root: Path, tokenizer, limit: int = 256) -> int:
    """Tokens the longest text of a dataset folder needs with its `</s>` (a question and its answer share one
    text), at most `limit`. The demo trains and samples at this length: padding is what a young text stream
    predicts everywhere, so the less of it the better, and no text of the folder is cut."""
    records = [record for split in SPLITS for records in read_split(data_root, split).values() for record in records]
    return _text_length(records, tokenizer, limit)


def _text_length(records: list, tokenizer, limit: int = 256) -> int:
    """`dataset_text_length` over records already read."""
    texts = set()  # the worlds repeat their texts thousands of times: tokenize each distinct one once
    for record in records:
        texts.add((record.prompt,))
        texts.add((record.question, record.caption) if record.question else (record.caption,))
    longest = 1
    for parts in texts:
        # every text gets its own </s> from the tokenizer; a question and answer share one, hence the -1 per join
        longest = max(longest, sum(len(tokenizer(part).input_ids) for part in parts) - (len(parts) - 1))
    return min(longest, limit)


def _common_side(paths: list[str]) -> int:
    """The longer side most of these images have."""
    sides = Counter()
    for path in paths:
        with Image.open(path) as image:
            sides[max(image.size)] += 1
    return sides.most_common(1)[0][0]
