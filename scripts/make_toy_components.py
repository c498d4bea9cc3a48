"""Fit the tiny frozen components to a dataset folder: T5 tokenizer and encoder, VAE, teacher.

    python scripts/make_toy_components.py --data runs/toy/world --out runs/toy/components

The tokenizer (sentencepiece unigram with T5's `<extra_id_*>` sentinels, `<extra_id_0>` the mask token) is trained
on every text of the folder's two splits; the VAE (a tiny AutoencoderKL) is trained on the training split's images
until its reconstructions reach --vae-psnr dB, and its latent scaling is then set from the data; the T5 encoder is
pretrained for --t5-steps steps to fill masked tokens of the folder's texts, as the real T5 was pretrained on text;
the tiny Qwen2.5-VL teacher is trained for --teacher-steps steps to match the training images with their captions
(CLIP's contrastive loss on exactly the two targets the alignment loss reads), as the real one knows images and
text. Each is an ordinary `from_pretrained` folder under OUT, loaded later through the same code as the full-size
components. Existing folders are reused; delete one to rebuild it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unialignment.toy.components import make_dataset_components
from unialignment.toy.folder import DatasetFolderError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("runs/toy/world"), help="dataset folder (train/, heldout/)")
    parser.add_argument("--out", type=Path, default=Path("runs/toy/components"))
    parser.add_argument("--vae-steps", type=int, default=2000, help="most VAE training steps")
    parser.add_argument("--vae-psnr", type=float, default=31.0, help="stop training the VAE at this PSNR (dB)")
    parser.add_argument("--t5-steps", type=int, default=400, help="masked-token pretraining steps of the encoder")
    parser.add_argument(
        "--teacher-steps", type=int, default=2000, help="image-caption steps of the teacher (0: random)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        folders, report = make_dataset_components(
            args.data,
            args.out,
            args.vae_steps,
            args.vae_psnr,
            t5_steps=args.t5_steps,
            teacher_steps=args.teacher_steps,
            seed=args.seed,
        )
    except DatasetFolderError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"tokenizer:    {folders.tokenizer} ({report.vocab_size} tokens)")
    if report.t5 is None:
        print(f"text encoder: {folders.text_encoder} (reused)")
    else:
        t5 = report.t5
        print(f"text encoder: {folders.text_encoder} ({t5.steps} steps, masked-token loss {t5.first_loss:.2f} -> "
              f"{t5.last_loss:.2f})")  # fmt: skip
    if report.vae is None:
        print(f"vae:          {folders.vae} (reused)")
    else:
        vae = report.vae
        print(f"vae:          {folders.vae} ({vae.steps} steps, {vae.psnr:.1f} dB at {report.image_size} px)")
    if report.teacher is None:
        print(f"teacher:      {folders.teacher} (reused, or random with --teacher-steps 0)")
    else:
        teacher = report.teacher
        print(
            f"teacher:      {folders.teacher} ({teacher.steps} steps, image-caption loss {teacher.first_loss:.2f} "
            f"-> {teacher.last_loss:.2f}, caption retrieval on the training pairs {teacher.retrieval_before} "
            f"-> {teacher.retrieval_after})"
        )
        if teacher.heldout is not None:
            print(f"teacher caption retrieval on the held-out pairs: {teacher.heldout}")


if __name__ == "__main__":
    main()
