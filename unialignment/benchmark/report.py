"""The benchmark's report: the FLOP formula and counts, and markdown tables of the sampling, memory and training
rows, with the goals of one H200 checked at full size."""

from __future__ import annotations

from unialignment.benchmark.workload import FEATURE_MODES, LEVERS, PLACEMENTS, SAMPLING_MODES, Tokens
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


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def training_section(rows: list[dict], matmul_tflops: float, peak_tflops: float) -> list[str]:
    legend = "; ".join(f"{name}: {meaning}" for name, meaning in FEATURE_MODES.items())
    levers = "; ".join(
        f"{name}: " + (", ".join(f"{key}={value}" for key, value in switches.items()) or "the config's `speed`")
        for name, switches in LEVERS.items()
    )
    lines = [
        "### Training: samples/s per GPU and peak memory",
        "",
        f"Frozen features: {legend}. Levers (`speed` switches on top of the config's): {levers}. MFU = model FLOPs "
        f"/ s against the measured matmul peak ({matmul_tflops:.4g} TFLOP/s) and the data-sheet peak "
        f"({peak_tflops:g}); HFU adds the recomputation of checkpointed blocks, against the measured peak.",
        "",
        "| task | px | frozen features | levers | micro-batch | samples/s | ms / step | peak GiB | model TFLOP/s | "
        "MFU | MFU (data sheet) | HFU | steps applied |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        key = f"| {row['task']} | {row['resolution']} | {row['features']} | {row['levers']} | {row['micro_batch']} |"
        if "status" in row:
            lines.append(f"{key} {row['status']} | — | — | — | — | — | — | — |")
            continue
        applied = f"{row['steps_applied']}/{row['steps_run']}" + ("" if row["loss_finite"] else ", loss not finite")
        lines.append(
            f"{key} {number(row['samples_per_s'])} | {number(row['ms_per_step'])} | {number(row['peak_gib'])} | "
            f"{number(row['tflops_per_s'])} | {percent(row['mfu'])} | {percent(row['mfu_datasheet'])} | "
            f"{percent(row['hfu'])} | {applied} |"
        )
    return lines


def sampling_section(title: str, rows: list[dict], columns: list[tuple[str, str]], rate: str) -> list[str]:
    names = [name for name, _ in columns]
    lines = [
        title,
        "",
        "Modes: " + "; ".join(f"{name}: {meaning}" for name, meaning in SAMPLING_MODES.items()) + ".",
        "",
        f"| {' | '.join(names)} | batch | s / call (median) | {rate} | peak GiB |",
        "| " + " | ".join(["---"] + ["---:"] * (len(names) + 3)) + " |",
    ]
    for row in rows:
        cells = [str(row[key]) for _, key in columns] + [str(row["batch"])]
        if "status" in row:
            cells += [row["status"], "—", "—"]
        else:
            cells += [number(row["seconds"]), number(row["per_s"]), number(row["peak_gib"])]
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def memory_section(rows: list[dict]) -> list[str]:
    lines = [
        "### Peak GPU memory of sampling (batch 1, bf16 transformer; text-to-image with guidance)",
        "",
        "Placements: " + "; ".join(f"{name}: {meaning}" for name, meaning in PLACEMENTS.items()) + ".",
        "",
        "| task | px | placement | peak GiB |",
        "| --- | ---: | --- | ---: |",
    ]
    for row in rows:
        value = row["status"] if "status" in row else number(row["peak_gib"])
        lines.append(f"| {row['task']} | {row['resolution']} | {row['placement']} | {value} |")
    return lines


def goals(results: dict) -> list[dict]:
    """The goals for one H200 (issues on training and sampling speed), each against the rows that measure it."""

    def best(rows: list[dict], rate: str, **key) -> dict | None:
        matching = [r for r in rows if "status" not in r and all(r.get(k) == v for k, v in key.items())]
        return max(matching, key=lambda r: r[rate]) if matching else None

    training, found = results.get("training", []), []

    def training_goal(goal: str, target: float, **key) -> None:
        row = best(training, "samples_per_s", **key)
        measured = None
        if row is not None:
            measured = f"{row['samples_per_s']:.1f} samples/s ({row['levers']}, micro-batch {row['micro_batch']})"
        found.append(
            dict(goal=goal, target=f">= {target} samples/s", measured=measured,
                 met=None if row is None else row["samples_per_s"] >= target)
        )  # fmt: skip

    training_goal("transformer only, text-to-image 512 px", 40, task="t2i", resolution=512, features="transformer")
    training_goal("transformer only, edit 512 px", 27, task="edit", resolution=512, features="transformer")
    training_goal("feature-cache step, text-to-image 512 px", 30, task="t2i", resolution=512, features="cache")
    training_goal("online step, text-to-image 512 px", 20, task="t2i", resolution=512, features="online")
    large = [r for r in training if r["resolution"] == 1024]
    fits = [r for r in large if "status" not in r and r["micro_batch"] >= 2]
    found.append(
        dict(
            goal="1024 px rows at micro-batch >= 2 without running out of memory",
            target="every 1024 px row",
            measured=f"{len(fits)} of {len(large)} rows ran" if large else None,
            met=(len(fits) == len(large)) if large else None,
        )
    )
    images = results.get("text_to_image", [])
    row = min(
        (r for r in images if "status" not in r and (r["resolution"], r["steps"], r["batch"]) == (512, 28, 1)),
        key=lambda r: r["seconds"],
        default=None,
    )
    found.append(
        dict(
            goal="text-to-image 512 px, 28 steps, CFG, batch 1",
            target="<= 0.25 s",
            measured=None if row is None else f"{row['seconds']:.3f} s ({row['mode']})",
            met=None if row is None else row["seconds"] <= 0.25,
        )
    )
    captions = results.get("caption", [])
    row = best(captions, "per_s", tokens=256, steps=64, batch=32)
    found.append(
        dict(
            goal="captioning, 256 tokens, 64 steps, batch 32",
            target=">= 2.2 captions/s",
            measured=None if row is None else f"{row['per_s']:.2f} captions/s ({row['mode']})",
            met=None if row is None else row["per_s"] >= 2.2,
        )
    )
    single = [r for r in captions if "status" not in r and (r["tokens"], r["steps"], r["batch"]) == (256, 64, 1)]
    row = min(single, key=lambda r: r["seconds"], default=None)
    found.append(
        dict(
            goal="captioning latency, 256 tokens, 64 steps, batch 1",
            target="<= 1.5 s",
            measured=None if row is None else f"{row['seconds']:.2f} s ({row['mode']})",
            met=None if row is None else row["seconds"] <= 1.5,
        )
    )
    memory = [
        r
        for r in results.get("memory", [])
        if (r["task"], r["resolution"], r["placement"]) == ("text-to-image", 512, "T5 offloaded") and "status" not in r
    ]
    found.append(
        dict(
            goal="text-to-image 512 px on a 24 GB card (T5 offloaded)",
            target="peak <= 20 GiB",
            measured=f"{memory[0]['peak_gib']:.1f} GiB" if memory else None,
            met=memory[0]["peak_gib"] <= 20 if memory else None,
        )
    )
    return found


def goals_section(rows: list[dict]) -> list[str]:
    lines = ["### Goals (one H200)", "", "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
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
    matmul = results["matmul"]
    lines = [
        f"## UniAlignment benchmark: {title}",
        "",
        f"- date: {header['date']}; device: {header['device']}",
        f"- software: {versions}",
        f"- command: `{header['command']}`",
        f"- matmul peak, measured: {matmul['tflops']:.4g} TFLOP/s ({matmul['size']}^3 {matmul['dtype']} product)",
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
    if results.get("text_to_image"):
        columns = [("mode", "mode"), ("px", "resolution"), ("steps", "steps"), ("guidance", "guidance_scale")]
        title = "### Text-to-image through UniAlignmentPipeline (T5, CFG denoising, VAE decode)"
        sections.append(sampling_section(title, results["text_to_image"], columns, "images/s"))
    if results.get("caption"):
        columns = [("mode", "mode"), ("px", "resolution"), ("tokens", "tokens"), ("steps", "steps")]
        title = "### Captioning through UniAlignmentPipeline (VAE encode, T5 + transformer per changed step)"
        sections.append(sampling_section(title, results["caption"], columns, "captions/s"))
    if results.get("memory"):
        sections.append(memory_section(results["memory"]))
    if "training" in results:
        sections.append(training_section(results["training"], results["matmul"]["tflops"], results["peak_tflops"]))
    if "goals" in results:
        sections.append(goals_section(results["goals"]))
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
