"""scripts/benchmark.py (over unialignment/benchmark/): its tiny CPU mode end to end in a subprocess (what CI keeps
working), its FLOP counts against unialignment/training/flops.py, and the pieces the full size relies on that a CPU
can check."""

import itertools
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from unialignment.benchmark import full_size
from unialignment.frozen.random_weights import build_with_random_weights as random_weights
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.models import UniAlignmentTransformer
from unialignment.toy.t5 import caption_corpus
from unialignment.toy.transformer import TINY_UNIALIGNMENT_CONFIG
from unialignment.toy.vae import TINY_VAE_CONFIG
from unialignment.training.config import load_config
from unialignment.training.flops import training_flops_per_sample, transformer_flops, transformer_flops_terms

REPO = Path(__file__).resolve().parents[1]
FULL_SIZE_COMPONENTS = REPO.parent / "shared" / "reference" / "full_size_components.json"
TINY_RESOLUTIONS = (32, 64)  # the --tiny defaults
TINY_CAPTION_BATCHES = (1, 16)


@pytest.fixture(scope="module")
def benchmark():
    """The script's globals (scripts/ is not a package)."""
    return runpy.run_path(str(REPO / "scripts" / "benchmark.py"), run_name="benchmark")


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    return tmp_path_factory.mktemp("benchmark")


@pytest.fixture(scope="module")
def tiny_run(tiny_out):
    """`python scripts/benchmark.py --tiny --out ...`: the printed tables (by section title) and the JSON."""
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--tiny", "--out", str(tiny_out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**environment, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, f"benchmark --tiny failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert (tiny_out / "results.md").read_text() in result.stdout
    return tables(result.stdout), json.loads((tiny_out / "results.json").read_text())


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Each `### title` section's table as rows of {column: cell}."""
    found, title, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
            found[title] = []
        elif title is not None and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                found[title].append(dict(zip(header, cells, strict=True)))
    return found


def section(printed: dict, prefix: str) -> list[dict[str, str]]:
    (title,) = [title for title in printed if title.startswith(prefix)]
    return printed[title]


def positive(cell: str) -> float:
    value = float(cell.replace(",", ""))
    assert math.isfinite(value) and value > 0, cell
    return value


def test_tiny_run_prints_every_row_with_positive_numbers(tiny_run, benchmark):
    printed, results = tiny_run
    args = benchmark["parse_args"](["--tiny"])
    plan = benchmark["training_plan"](args, load_config(REPO / "configs" / "debug.py").batch.micro_batch_size)
    training = section(printed, "Training")
    expected = [(r.task, str(r.resolution), r.features, r.levers, str(r.micro_batch)) for r in plan]
    assert [(r["task"], r["px"], r["frozen features"], r["levers"], r["micro-batch"]) for r in training] == expected
    # Each lever alone and all together, at the first resolution; every task and mode plain and with all levers.
    assert {r.levers for r in plan} >= {"plain", "prefetch", "fused t2i passes", "masked text loss", "all"}
    assert {(r.task, r.features) for r in plan if r.levers == "plain"} == set(
        itertools.product(("t2i", "edit"), ("online", "cache", "transformer"))
    )
    for row in training:
        for column in ("samples/s", "ms / step", "model TFLOP/s"):
            positive(row[column])
        assert row["steps applied"] == "3/3"  # 1 warm-up + 2 timed, none skipped, losses finite
        assert row["MFU (data sheet)"] == "—"  # no GPU data sheet to compare a CPU with
    for row in results["training"]:  # against the matmul peak measured in the same run
        assert row["hfu"] >= row["mfu"] > 0
        assert row["mfu"] == pytest.approx(row["tflops_per_s"] / results["matmul"]["tflops"])
        assert row["hfu"] > row["mfu"] or row["hardware_flops_per_sample"] == row["flops_per_sample"]

    images = section(printed, "Text-to-image")
    assert [(r["mode"], r["px"], r["steps"], r["batch"]) for r in images] == [
        ("eager", "64", "28", "1"), ("fast", "64", "28", "1"), ("fast", "64", "50", "1"),
    ]  # fmt: skip
    captions = section(printed, "Captioning")
    assert [(r["mode"], r["batch"]) for r in captions] == [("eager", "1")] + [
        ("fast", str(batch)) for batch in TINY_CAPTION_BATCHES
    ]
    assert {row["steps"] for row in captions} == {"64"}
    for row in [*images, *captions]:
        seconds, rate = positive(row["s / call (median)"]), positive(row.get("images/s") or row["captions/s"])
        assert rate == pytest.approx(int(row["batch"]) / seconds, rel=0.02)
    memory = section(printed, "Peak GPU memory")
    assert {(r["task"], r["placement"]) for r in memory} == set(
        itertools.product(("text-to-image", "caption"), ("full", "T5 offloaded", "sequential offload"))
    )
    assert "goals" not in results  # the goals are for the full size on an H200


def test_every_row_is_written_as_it_finishes(tiny_run, tiny_out):
    _, results = tiny_run
    written = [json.loads(path.read_text()) for path in sorted((tiny_out / "rows").glob("*.json"))]
    assert written[0]["section"] == "header" and written[0]["matmul"]["tflops"] > 0
    by_section = {}
    for row in written[1:]:
        by_section.setdefault(row.pop("section"), []).append(row)
    for name in ("text_to_image", "caption", "memory"):
        assert by_section[name] == results[name]
    assert by_section["train"] == json.loads(json.dumps(results["training"]))


def test_a_row_past_the_time_budget_is_skipped_and_a_failing_row_recorded(benchmark):
    workload = sys.modules[benchmark["benchmark_training"].__module__]
    device = torch.device("cpu")
    assert workload.guarded({"a": 1}, lambda: {"b": 2}, workload.Deadline(None), device) == {"a": 1, "b": 2}
    skipped = workload.guarded({"a": 1}, lambda: {"b": 2}, workload.Deadline(-1.0), device)
    assert skipped == {"a": 1, "status": "skipped: time budget"}

    def failing():
        raise RuntimeError("boom\nmore")

    assert workload.guarded({"a": 1}, failing, workload.Deadline(None), device)["status"] == "error: RuntimeError: boom"


def test_printed_flops_match_the_flops_module(tiny_run):
    printed, results = tiny_run
    config = results["model_config"]
    # The run trains the transformer of configs/debug.py, its text head sized by the tiny tokenizer.
    debug = load_config(REPO / "configs" / "debug.py")
    assert {key: config[key] for key in debug.model.config} == debug.model.config
    downsampling = 2 ** (len(TINY_VAE_CONFIG["block_out_channels"]) - 1)
    text_tokens = debug.components.text_length

    rows = section(printed, "Model FLOPs")
    assert {(row["task"], row["px"]) for row in rows} == set(
        itertools.product(("t2i", "edit"), map(str, TINY_RESOLUTIONS))
    )
    for row in rows:
        image_tokens = (int(row["px"]) // downsampling // config["patch_size"]) ** 2
        condition_tokens = image_tokens if row["task"] == "edit" else 0
        assert (int(row["N_img"]), int(row["N_cond"]), int(row["N_txt"])) == (
            image_tokens,
            condition_tokens,
            text_tokens,
        )
        image_pass = transformer_flops(config, image_tokens, text_tokens, False, True, condition_tokens)
        text_pass = transformer_flops(config, image_tokens, text_tokens, True, False)
        assert int(row["image-stream pass"].replace(",", "")) == image_pass
        assert int(row["text-stream pass"].replace(",", "")) == text_pass
        per_sample = training_flops_per_sample(config, image_tokens, text_tokens, condition_tokens)
        assert int(row["training FLOPs / sample"].replace(",", "")) == per_sample == 3 * (image_pass + text_pass)

    by_shape = {(row["task"], row["resolution"]): row["training_flops_per_sample"] for row in results["flops"]}
    for row in results["training"]:
        assert row["flops_per_sample"] == by_shape[row["task"], row["resolution"]]
        assert row["tflops_per_s"] == pytest.approx(row["flops_per_sample"] * row["samples_per_s"] / 1e12)


def test_flop_terms_add_up_to_the_pass():
    config = {**TINY_UNIALIGNMENT_CONFIG}
    for text_head, image_head in itertools.product((False, True), repeat=2):
        terms = transformer_flops_terms(config, 16, 12, text_head, image_head, condition_tokens=16)
        assert sum(terms.values()) == transformer_flops(config, 16, 12, text_head, image_head, condition_tokens=16)
        assert ("2 D vocab N_txt" in terms, "2 D p^2 C_out N_img" in terms) == (text_head, image_head)


def test_full_size_refuses_to_run_on_a_cpu(benchmark, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--tiny.*--allow-cpu"):
        benchmark["main"]([])


def test_full_size_components_match_the_reference():
    if not FULL_SIZE_COMPONENTS.is_file():
        pytest.skip(f"{FULL_SIZE_COMPONENTS} is not beside this checkout")
    reference = json.loads(FULL_SIZE_COMPONENTS.read_text())
    t5 = reference["t5_v1_1_xxl_encoder (SD3 text_encoder_3)"]
    assert {key: t5[key] for key in full_size.T5_XXL_ENCODER} == full_size.T5_XXL_ENCODER
    assert t5["tokenizer_len"] == full_size.T5_TOKENIZER_LENGTH
    assert reference["sd3_vae (AutoencoderKL)"] == full_size.SD3_VAE
    teacher = reference["qwen2_5_vl_7b_instruct (alignment teacher)"]
    assert teacher == {"text": full_size.QWEN2_5_VL_7B_TEXT, "vision": full_size.QWEN2_5_VL_7B_VISION}


def test_synthetic_t5_tokenizer_is_laid_out_as_t5s():
    tokenizer = full_size.synthetic_t5_tokenizer(400, caption_corpus())
    tokenizer.pad_token = tokenizer.eos_token  # as load_t5_tokenizer does
    t5 = FrozenT5(
        tokenizer, T5EncoderModel(T5Config(d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, vocab_size=448))
    )
    assert t5.vocab_size == 400
    assert t5.mask_token_id == 399  # <extra_id_0> last, as in SD3's tokenizer (32099 of 32100)
    ids = t5.tokenize(caption_corpus()[:20]).input_ids
    assert tokenizer.unk_token_id not in ids.tolist()
    with pytest.raises(ValueError, match="cannot hold"):
        full_size.synthetic_t5_tokenizer(200, caption_corpus())


def test_random_weights_are_drawn_on_the_device_with_ties_and_buffers_kept():
    config = T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, vocab_size=64)
    encoder = random_weights(lambda: T5EncoderModel._from_config(config), torch.device("cpu"), torch.bfloat16, 0)
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in encoder.parameters())
    assert encoder.encoder.final_layer_norm.weight.eq(1).all()
    assert 0.01 < encoder.shared.weight.float().std() < 0.03

    # The position table is computed at construction as usual, then cast like the parameters.
    transformer = random_weights(
        lambda: UniAlignmentTransformer(**TINY_UNIALIGNMENT_CONFIG), torch.device("cpu"), torch.bfloat16, 0, True
    )
    reference = UniAlignmentTransformer(**TINY_UNIALIGNMENT_CONFIG)
    assert transformer.pos_embed.pos_embed.dtype == torch.bfloat16
    torch.testing.assert_close(
        transformer.pos_embed.pos_embed.float(), reference.pos_embed.pos_embed, atol=1e-2, rtol=0
    )
    assert not any(p.is_meta for p in transformer.parameters())


def test_dataloader_benchmark_times_every_source_task_and_decoding():
    dataloader = runpy.run_path(str(REPO / "scripts" / "benchmark_dataloader.py"), run_name="benchmark_dataloader")
    rows = dataloader["main"](["--resolution", "64", "--images", "2", "--samples", "4", "--batch", "2"])
    combinations = {(r["task"], r["source"], r["draft"], r["uint8"]) for r in rows}
    assert len(combinations) == len(rows) == 12  # (t2i, edit) x (jpg full/draft, png full) x (float32, uint8)
    assert all(row["samples_per_s"] > 0 for row in rows)
