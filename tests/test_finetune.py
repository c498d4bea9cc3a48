"""The three uses as a researcher runs them: fine-tuning from a released pipeline folder (the authors' layout, and
one our own trainer exported) through `train_unialignment.sh configs/finetune_released.py`, exporting, and
`inference.py` on the result; LoRA runs exported merged or as adapters, which give the same images; models by hub
id from huggingface_hub's cache, offline."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from PIL import Image
from transformers import T5EncoderModel

from unialignment.frozen.text_encoder import MASK_EMBEDDING_FILE, load_t5_tokenizer
from unialignment.models import UniAlignmentTransformer
from unialignment.pipelines import UniAlignmentPipeline
from unialignment.toy.components import make_tiny_components
from unialignment.toy.transformer import TINY_SD3_CONFIG

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "runs" / "debug_assets" / "data"
# The data, batch and length of a test run; everything else comes from configs/finetune_released.py.
RUN = [
    "--data.resolution", "32", "--batch.global_batch_size", "2", "--batch.micro_batch_size", "1",
    "--max_steps", "2", "--checkpoint.every_steps", "2", "--data.num_workers", "0",
    "--logging.sample_every_steps", "0",
]  # fmt: skip
FAST = ["--size", "32", "--steps", "2", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def debug_assets():
    subprocess.run([sys.executable, "scripts/make_debug_assets.py"], cwd=REPO, check=True, capture_output=True)


def _environment(**extra) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**environment, "OMP_NUM_THREADS": "1", **extra}


def _ok(command: list, **extra) -> subprocess.CompletedProcess:
    command = [str(part) for part in command]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=_environment(**extra))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


def _groups() -> str:
    return json.dumps(
        [
            {"name": "t2i", "weight": 1, "datasets": [{"path": str(DATA / "t2i.jsonl"), "task": "t2i"}]},
            {"name": "edit", "weight": 1, "datasets": [{"path": str(DATA / "edit.jsonl"), "task": "edit"}]},
        ]
    )


def authors_folder(folder: Path) -> Path:
    """A tiny pipeline folder in the authors' released layout: their pipeline and transformer class names, their
    transformer config keys only, and the learned mask embedding beside the components."""
    components = make_tiny_components(folder.parent / "components")
    tokenizer = load_t5_tokenizer(components.tokenizer)
    text_encoder = T5EncoderModel.from_pretrained(components.text_encoder)
    vae = AutoencoderKL.from_pretrained(components.vae)
    sizes = dict(
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        joint_attention_dim=text_encoder.config.d_model,
        vocab_size=len(tokenizer),
        teacher_dim=32,
    )
    transformer = UniAlignmentTransformer(**{**TINY_SD3_CONFIG, **sizes, "num_layers": 8})
    UniAlignmentPipeline(transformer, FlowMatchEulerDiscreteScheduler(), vae, text_encoder, tokenizer).save_pretrained(
        folder
    )
    index = json.loads((folder / "model_index.json").read_text())
    authors_transformer = ["unialignment_authors", "SD3JointModelFlexible"]
    index.update(_class_name="UniAlignmentPipelineAuthors", transformer=authors_transformer)
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    authors = {"_class_name": "SD3JointModelFlexible", "_diffusers_version": "0.31.0"}
    keys = (*TINY_SD3_CONFIG, "dual_attention_layers", "qk_norm", "vocab_size", "teacher_dim")
    (folder / "transformer" / "config.json").write_text(json.dumps({**authors, **{k: config[k] for k in keys}}))
    torch.save(torch.randn(text_encoder.config.d_model), folder / MASK_EMBEDDING_FILE)
    return folder


def _fine_tune_export_and_infer(released: Path, work: Path) -> Path:
    run = work / "run"
    _ok(["bash", "train_unialignment.sh", "configs/finetune_released.py", "--model.load_from", released,
         "--components.sd3", released, "--work_dir", run, "--data.groups", _groups(), *RUN])  # fmt: skip
    exported = work / "pipeline"
    _ok([sys.executable, "scripts/export_pipeline.py", "--run", run, "--out", exported])
    assert (exported / MASK_EMBEDDING_FILE).is_file()  # the release's learned mask embedding travelled along
    image = next((DATA / "images").glob("*.png"))
    _ok([sys.executable, "inference.py", "t2i", "--model", exported, "--prompt", "a red square", "--output",
         work / "t2i.png", *FAST])  # fmt: skip
    _ok([sys.executable, "inference.py", "edit", "--model", exported, "--image", image, "--instruction",
         "Make it blue.", "--output", work / "edit.png", *FAST])  # fmt: skip
    caption = _ok([sys.executable, "inference.py", "caption", "--model", exported, "--image", image, "--length", "8",
                   *FAST])  # fmt: skip
    assert caption.stdout.strip()
    for name in ("t2i.png", "edit.png"):
        with Image.open(work / name) as output:
            assert output.size == (32, 32)
    return exported


def test_fine_tuning_the_authors_release_and_our_own_export(tmp_path):
    released = authors_folder(tmp_path / "UniAlignment")
    ours = _fine_tune_export_and_infer(released, tmp_path / "from_release")
    _fine_tune_export_and_infer(ours, tmp_path / "from_ours")  # a folder our exporter wrote is a release too


def test_lora_exports_merged_and_as_adapters_give_the_same_images(tmp_path):
    base = tmp_path / "base"
    common = ["--data.groups", _groups(), *RUN]
    _ok([sys.executable, "scripts/train.py", "configs/debug.py", "--work_dir", base, *common])
    lora_run = tmp_path / "lora"
    _ok([sys.executable, "scripts/train.py", "configs/debug.py", "--work_dir", lora_run, *common, "--model.lora_rank",
         "4", "--model.lora_alpha", "8", "--model.load_from", base / "export" / "ema", "--optimizer.lr", "0.2",
         "--optimizer.warmup_steps", "1"])  # fmt: skip
    merged, adapters = tmp_path / "merged", tmp_path / "adapters"
    raw = ["--run", lora_run, "--weights", "raw"]  # the trained adapters (two steps barely move their EMA)
    _ok([sys.executable, "scripts/export_pipeline.py", *raw, "--out", merged, "--merge-lora"])
    _ok([sys.executable, "scripts/export_pipeline.py", *raw, "--out", adapters])
    assert (adapters / "pytorch_lora_weights.safetensors").is_file()
    assert not (merged / "pytorch_lora_weights.safetensors").exists()

    prompt = ["t2i", "--prompt", "a red square on the left", *FAST]
    _ok([sys.executable, "inference.py", *prompt, "--model", merged, "--output", tmp_path / "merged.png"])
    _ok([sys.executable, "inference.py", *prompt, "--model", adapters, "--lora", adapters, "--output",
         tmp_path / "adapters.png"])  # fmt: skip
    _ok([sys.executable, "inference.py", *prompt, "--model", adapters, "--output", tmp_path / "base.png"])
    names = ("merged", "adapters", "base")
    images = {name: np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=int) for name in names}
    assert np.abs(images["merged"] - images["adapters"]).max() <= 1  # fused and applied adapters: one model
    assert np.abs(images["merged"] - images["base"]).max() > 8  # and the adapters did something


def test_models_by_hub_id_from_the_local_cache_offline(tmp_path):
    """`--model org/name` as diffusers and transformers take it: a snapshot in huggingface_hub's cache, laid out as
    `huggingface-cli download` leaves it; with HF_HUB_OFFLINE=1 nothing is fetched."""
    snapshot = tmp_path / "hub" / "models--glimmer16--UniAlignment" / "snapshots" / "0123abc"
    authors_folder(snapshot)
    (tmp_path / "hub" / "models--glimmer16--UniAlignment" / "refs").mkdir()
    (tmp_path / "hub" / "models--glimmer16--UniAlignment" / "refs" / "main").write_text("0123abc")
    offline = dict(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    _ok([sys.executable, "inference.py", "t2i", "--model", "glimmer16/UniAlignment", "--prompt", "a red square",
         "--output", tmp_path / "hub.png", *FAST], **offline)  # fmt: skip
    local = shutil.copytree(snapshot, tmp_path / "local")
    _ok([sys.executable, "inference.py", "t2i", "--model", local, "--prompt", "a red square", "--output",
         tmp_path / "local.png", *FAST])  # fmt: skip
    assert (tmp_path / "hub.png").read_bytes() == (tmp_path / "local.png").read_bytes()

    missing = subprocess.run(
        [sys.executable, "inference.py", "t2i", "--model", "glimmer16/Nothing", "--prompt", "a", "--output",
         str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True, env=_environment(**offline),
    )  # fmt: skip
    assert missing.returncode == 2 and "glimmer16/Nothing" in missing.stderr and "Traceback" not in missing.stderr
