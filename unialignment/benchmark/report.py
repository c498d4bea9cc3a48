"""The benchmark's report: the FLOP formula and counts, and markdown tables of the training and sampling rows,
with the goals checked at full size."""

from __future__ import annotations

from unialignment.benchmark.workload import FEATURE_MODES, Tokens
from unialignment.training.flops import training_flops_per_sample, transformer_flops, transformer_flops_terms

# --- the report -----------------------------------------------------------------------------------------------------


def number(value: float | None, digits: int = 3) -> str:
    """Significant digits, thousands separated; "—" for what was not measured."""
    if value is None:
        return "—"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def flops_rows(model_config, token_table: dict[tuple[str, int], Tokens]) -> list[dict]:
    rows = []
    for (task, resolution), tokens in token_table.items():
        image_pass = transformer_flops(
            model_config, tokens.image, tokens.text, text_head=False, image_head=True, condition_tokens=tokens.condition
        )
        text_pass = transformer_flops(model_config, tokens.image, tokens.text, text_head=True, image_head=False)
        rows.append(
            dict(
                task=task,
                resolution=resolution,
                image_tokens=tokens.image,
                condition_tokens=tokens.condition,
                text_tokens=tokens.text,
                image_pass_flops=image_pass,
                text_pass_flops=text_pass,
                training_flops_per_sample=training_flops_per_sample(
                    model_config, tokens.image, tokens.text, tokens.condition
                ),
            )
        )
    return rows


def flops_section(model_config, rows: list[dict], peak_tflops: float) -> list[str]:
    terms = transformer_flops_terms(model_config, 1, 1, text_head=True, image_head=True)
    hidden = model_config.num_attention_heads * model_config.attention_head_dim
    symbols = (
        f"D = {hidden}, num_layers = {model_config.num_layers}, p = {model_config.patch_size}, "
        f"C_in = {model_config.in_channels}, C_out = {model_config.out_channels}, "
        f"joint_attention_dim = {model_config.joint_attention_dim}, vocab = {model_config.vocab_size}"
    )
    lines = [
        "### Model FLOPs (unialignment/training/flops.py)",
        "",
        "Training FLOPs per sample = 3 x (image-stream pass + text-stream pass), backward counted as twice the "
        "forward and a multiply-add as 2 FLOPs. One pass of one sample:",
        "",
        "    " + " + ".join(terms),
        "",
        "with T = N_img + N_cond + N_txt in the image-stream pass and N_img + N_txt in the text-stream pass (which "
        "has no condition images); the image head (2 D p^2 C_out N_img) runs in the image-stream pass only, the "
        f"text head (2 D vocab N_txt) in the text-stream pass only. Here {symbols}. Norms, activations, softmax, "
        "adaLN modulation and the alignment heads are left out (small). MFU = training FLOPs per sample x samples/s "
        f"/ peak, peak = {peak_tflops:g} TFLOP/s (--peak-tflops).",
        "",
        "| task | px | N_img | N_cond | N_txt | image-stream pass | text-stream pass | training FLOPs / sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['resolution']} | {row['image_tokens']} | {row['condition_tokens']} | "
            f"{row['text_tokens']} | {row['image_pass_flops']:,} | {row['text_pass_flops']:,} | "
            f"{row['training_flops_per_sample']:,} |"
        )
    return lines


def training_section(rows: list[dict]) -> list[str]:
    legend = "; ".join(f"{name}: {meaning}" for name, meaning in FEATURE_MODES.items())
    lines = [
        "### Training: samples/s per GPU and peak memory",
        "",
        f"Frozen features: {legend}.",
        "",
        "| task | px | frozen features | samples/s | ms / step (median) | peak GiB | model TFLOP/s | MFU | steps "
        "applied |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        key = f"| {row['task']} | {row['resolution']} | {row['features']} |"
        if "status" in row:
            lines.append(f"{key} {row['status']} | — | — | — | — | — |")
            continue
        mfu = "—" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        applied = f"{row['steps_applied']}/{row['steps_run']}" + ("" if row["loss_finite"] else ", loss not finite")
        lines.append(
            f"{key} {number(row['samples_per_s'])} | {number(row['ms_per_step'])} | {number(row['peak_gib'])} | "
            f"{number(row['tflops_per_s'])} | {mfu} | {applied} |"
        )
    return lines


def sampling_section(title: str, rows: list[dict], columns: list[tuple[str, str]], rate: str) -> list[str]:
    names = [name for name, _ in columns]
    lines = [
        title,
        "",
        f"| {' | '.join(names)} | batch | s / call (median) | {rate} | peak GiB |",
        "| " + " | ".join(["---:"] * (len(names) + 4)) + " |",
    ]
    for row in rows:
        cells = [str(row[key]) for _, key in columns] + [str(row["batch"])]
        if "status" in row:
            cells += [row["status"], "—", "—"]
        else:
            cells += [number(row["seconds"]), number(row["per_s"]), number(row["peak_gib"])]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def goals(results: dict) -> list[dict]:
    """The issue's goals for one H100, each against the row that measures it, when that row was run."""

    def training(task: str, features: str) -> dict | None:
        rows = [
            r
            for r in results.get("training", [])
            if (r["task"], r["resolution"], r["features"]) == (task, 512, features)
        ]
        return rows[0] if rows and "status" not in rows[0] else None

    found = []
    row = training("t2i", "transformer")
    found.append(
        dict(
            goal="transformer training, text-to-image 512 px",
            # 33 x 12.0 TFLOP = 396 TFLOP/s: the 50% is of the ~800 TFLOP/s an H100 reaches on a large bf16
            # matrix product (reference_speed_h100.json), 40% of the 989 TFLOP/s data-sheet peak.
            target=">= 33 samples/s (issue: >= 50% MFU of ~800 TFLOP/s reachable)",
            measured=None
            if row is None
            else f"{row['samples_per_s']:.1f} samples/s, {row['tflops_per_s']:.0f} TFLOP/s",
            met=None if row is None else row["samples_per_s"] >= 33,
        )
    )
    for features, target in (("cache", 25), ("online", 15)):
        row = training("t2i", features)
        found.append(
            dict(
                goal=f"end-to-end training step, text-to-image 512 px, {FEATURE_MODES[features]}",
                target=f">= {target} samples/s",
                measured=None if row is None else f"{row['samples_per_s']:.1f} samples/s",
                met=None if row is None else row["samples_per_s"] >= target,
            )
        )
    images = [
        r
        for r in results.get("text_to_image", [])
        if (r["resolution"], r["steps"], r["batch"]) == (512, 28, 1) and r["guidance_scale"] > 1 and "status" not in r
    ]
    found.append(
        dict(
            goal="text-to-image 512 px, 28 steps, CFG, batch 1",
            target="<= 0.35 s",
            measured=f"{images[0]['seconds']:.3f} s" if images else None,
            met=images[0]["seconds"] <= 0.35 if images else None,
        )
    )
    captions = [r for r in results.get("caption", []) if (r["tokens"], r["steps"]) == (256, 64) and "status" not in r]
    best = max(captions, key=lambda r: r["per_s"]) if captions else None
    found.append(
        dict(
            goal="captioning, 256 tokens, 64 steps (best batch)",
            target=">= 4.5 captions/s",
            measured=None if best is None else f"{best['per_s']:.2f} captions/s at batch {best['batch']}",
            met=None if best is None else best["per_s"] >= 4.5,
        )
    )
    return found


def goals_section(rows: list[dict]) -> list[str]:
    lines = ["### Goals (issue #8, one H100)", "", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    for row in rows:
        met = "not measured" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['goal']} | {row['target']} | {row['measured'] or '—'} | {met} |")
    return lines


def count(parameters: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.3f} {unit}"
    return str(parameters)


def header_section(results: dict) -> list[str]:
    header, setup = results["header"], results["setup"]
    title = (
        "tiny toy components: a smoke check of the script on this device, not a speed result"
        if header["tiny"]
        else "full size, random weights"
    )
    versions = ", ".join(
        f"{name} {header[name]}" for name in ("python", "torch", "diffusers", "transformers", "deepspeed")
    )
    sizes = setup["parameters"]
    lines = [
        f"## UniAlignment benchmark: {title}",
        "",
        f"- date: {header['date']}; device: {header['device']}",
        f"- software: {versions}",
        f"- command: `{header['command']}`",
        f"- weights: random. Transformer {count(sizes['transformer'])} parameters ({setup['transformer']}); "
        f"frozen in {setup['components_dtype']}: T5 encoder {count(sizes['t5'])}, VAE {count(sizes['vae'])}, "
        f"teacher {count(sizes['teacher'])} (vision tower and input embeddings)",
    ]
    if "training" in setup:
        lines.append(f"- training: {setup['training']}")
    if "sampling" in setup:
        lines.append(f"- sampling: {setup['sampling']}")
    return lines


def markdown(results: dict) -> str:
    sections = [
        header_section(results),
        flops_section(results["model_config"], results["flops"], results["peak_tflops"]),
    ]
    if "training" in results:
        sections.append(training_section(results["training"]))
    if "text_to_image" in results:
        columns = [("px", "resolution"), ("steps", "steps"), ("guidance", "guidance_scale")]
        title = "### Text-to-image through UniAlignmentPipeline (T5, CFG denoising, VAE decode)"
        sections.append(sampling_section(title, results["text_to_image"], columns, "images/s"))
    if "caption" in results:
        columns = [("px", "resolution"), ("tokens", "tokens"), ("steps", "steps")]
        title = "### Captioning through UniAlignmentPipeline (VAE encode, T5 + transformer per changed step)"
        sections.append(sampling_section(title, results["caption"], columns, "captions/s"))
    if "goals" in results:
        sections.append(goals_section(results["goals"]))
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
