"""Full-size numerics check of the UniAlignment transformer on one GPU, with random weights.

Builds the transformer at the authors' config (2.124 B trainable parameters), runs the image-stream pass
(512 px target, optionally one 512 px condition image) and the text-stream pass (256 tokens) of a
micro-batch in float32 and under bf16 autocast, and prints a table: relative error of bf16 against float32
for the velocity, the text logits and the alignment heads, plus time and peak memory of a forward+backward
of both passes. It checks what only a GPU can: that the model is numerically sound in bf16 at full size.

    python scripts/check_full_size.py --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unialignment.models import UniAlignmentTransformer


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def run_passes(model, latents, condition, prompt, noisy_text, timesteps):
    image_pass = model(latents, prompt, timesteps, condition, return_hidden_states=True, return_alignment=True)
    text_pass = model(
        latents,
        noisy_text,
        torch.zeros_like(timesteps),
        return_velocity=False,
        return_text_logits=True,
        return_alignment=True,
    )
    return image_pass, text_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", type=Path, help="a transformer config.json (default: the model's defaults, the authors' config)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text-length", type=int, default=256)
    parser.add_argument("--edit", action="store_true", help="add one condition image (an edit micro-batch)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("This check needs a CUDA GPU.")
    device = torch.device("cuda")
    torch.manual_seed(0)

    config = json.loads(args.config.read_text()) if args.config else {}
    model = UniAlignmentTransformer.from_config(config).to(device)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    side = args.resolution // 8
    latents = torch.randn(args.batch_size, model.config.in_channels, side, side, device=device)
    condition = [torch.randn_like(latents)] if args.edit else None
    prompt = torch.randn(args.batch_size, args.text_length, model.config.joint_attention_dim, device=device) * 0.2
    inputs = (
        latents,
        condition,
        prompt,
        torch.randn_like(prompt),
        torch.linspace(100, 900, args.batch_size, device=device),
    )
    rows = precision_errors(model, inputs)
    median, finite = time_training_passes(model, inputs)

    print(
        f"\nUniAlignment transformer, {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    )
    print(
        f"micro-batch {args.batch_size}, {args.resolution} px, {args.text_length} text tokens, edit={args.edit}, "
        f"checkpointing={args.gradient_checkpointing}\n"
    )
    print(f"| {'bf16 autocast vs float32':<26} | relative error |")
    print(f"|{'-' * 28}|{'-' * 16}|")
    for name, error in rows:
        print(f"| {name:<26} | {error:>14.2e} |")
    print(
        f"\nforward+backward of both passes: {median * 1000:.0f} ms median ({args.batch_size / median:.1f} samples/s), "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, loss finite: {finite}"
    )


def precision_errors(model, inputs) -> list[tuple[str, float]]:
    """Relative error of each output under bf16 autocast against float32."""
    with torch.no_grad():
        exact = run_passes(model, *inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            approx = run_passes(model, *inputs)
    return [
        ("velocity", relative_error(approx[0].velocity, exact[0].velocity)),
        ("image final states", relative_error(approx[0].image_hidden_states, exact[0].image_hidden_states)),
        ("image alignment head", relative_error(approx[0].image_alignment, exact[0].image_alignment)),
        ("text logits", relative_error(approx[1].text_logits, exact[1].text_logits)),
        ("text alignment head", relative_error(approx[1].text_alignment, exact[1].text_alignment)),
    ]


def time_training_passes(model, inputs) -> tuple[float, bool]:
    """Median seconds of a forward + backward of both passes under bf16 autocast (fp32 weights), as training runs
    them, and whether the last loss was finite."""
    timings = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image_pass, text_pass = run_passes(model, *inputs)
            loss = image_pass.velocity.float().square().mean() + text_pass.text_logits.float().logsumexp(-1).mean()
        loss.backward()
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return sorted(timings[1:])[len(timings[1:]) // 2], bool(torch.isfinite(loss))


if __name__ == "__main__":
    main()
