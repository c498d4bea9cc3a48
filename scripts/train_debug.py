"""A short CPU training run of the debug-size UniAlignment model on coloured shapes.

Builds the tiny frozen components (T5, VAE, Qwen2.5-VL teacher) locally, encodes every scene of the
shapes world once, then trains the tiny transformer with the full objective (rectified flow, masked
diffusion, contrastive and representation alignment) and prints how each loss term moved. Everything
runs through the same code as a full-size run; only the sizes differ.

    python scripts/train_debug.py --steps 300 --out runs/debug
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from unialignment.frozen.vae import pil_to_pixels
from unialignment.toy.components import load_tiny_components, make_tiny_components
from unialignment.toy.shapes import all_scenes, draw_scene
from unialignment.toy.transformer import make_tiny_transformer
from unialignment.training.objective import LossWeights, ObjectiveConfig, TrainingBatch, UniAlignmentObjective


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/debug"), help="run folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-alignment", action="store_true", help="switch both alignment losses off")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be positive.")
    torch.manual_seed(args.seed)
    components = load_tiny_components(make_tiny_components(args.out / "components"))
    t5, vae, teacher = components.t5, components.vae, components.teacher

    # Encode the whole world once: latent distributions, prompt states, caption ids, teacher targets.
    scenes = all_scenes()
    images = [draw_scene(scene, args.image_size) for scene in scenes]
    captions = [scene.caption for scene in scenes]
    latent_mean, latent_std = vae.latent_distribution(pil_to_pixels(images))
    prompt_embeds = t5.encode(captions)
    caption_ids = t5.tokenize(captions).input_ids
    teacher_image_targets, teacher_text_targets = teacher.image_targets(images), teacher.text_targets(captions)

    model = make_tiny_transformer(
        seed=args.seed,
        in_channels=vae.latent_channels,
        out_channels=vae.latent_channels,
        joint_attention_dim=t5.hidden_size,
        vocab_size=t5.vocab_size,
        teacher_dim=teacher.dim,
    )
    weights = LossWeights(align_image=0.0, align_text=0.0, contrastive=0.0) if args.no_alignment else LossWeights()
    objective = UniAlignmentObjective(
        ObjectiveConfig(weights=weights),
        FlowMatchEulerDiscreteScheduler(),
        t5.mask_token_id,
        t5.encode_ids,
        t5.null_prompt_embeds(),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    writer = SummaryWriter(args.out / "tensorboard")

    history = []
    progress = tqdm(range(args.steps), desc="train", dynamic_ncols=True)
    for step in progress:
        indices = torch.randint(len(scenes), (args.batch_size,), generator=generator)
        batch = TrainingBatch(
            target_latents=vae.sample_latents(latent_mean[indices], latent_std[indices], generator),
            prompt_embeds=prompt_embeds[indices],
            caption_ids=caption_ids[indices],
            teacher_image_targets=teacher_image_targets[indices],
            teacher_text_targets=teacher_text_targets[indices],
        )
        losses = objective(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

        scalars = losses.scalars()
        history.append(scalars)
        for name, value in scalars.items():
            writer.add_scalar(f"loss/{name}", value, step)
        writer.add_scalar("train/grad_norm", grad_norm.item(), step)
        progress.set_postfix(loss=f"{scalars['total']:.3f}")
    writer.close()

    model.save_pretrained(args.out / "transformer")
    window = max(1, min(20, len(history) // 2))
    print(f"\n{'loss term':<14}{'first ' + str(window) + ' steps':>18}{'last ' + str(window) + ' steps':>18}")
    for name in history[0]:
        first = sum(h[name] for h in history[:window]) / window
        last = sum(h[name] for h in history[-window:]) / window
        print(f"{name:<14}{first:>18.4f}{last:>18.4f}")
    print(f"\nweights: {args.out / 'transformer'}   TensorBoard: {args.out / 'tensorboard'}")


if __name__ == "__main__":
    main()
