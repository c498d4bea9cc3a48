"""Every config loads and is checked strictly; the reference settings are the stage defaults; the debug config
fits the tiny components that `scripts/make_debug_assets.py` builds; the launch script parses."""

from __future__ import annotations

import runpy
import subprocess
from pathlib import Path

import pytest
import torch

from unialignment.toy.components import load_tiny_components
from unialignment.training.builders import build_transformer
from unialignment.training.config import BatchConfig, ConfigError, TrainConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py")) + sorted((ROOT / "configs" / "toy").glob("*.py"))
STAGE1 = ROOT / "configs" / "stage1_t2i_caption.py"
DEBUG_ASSETS = "runs/debug_assets"  # where configs/debug.py expects scripts/make_debug_assets.py's output


def load_script(name: str) -> dict:
    """The globals of a script in scripts/, which is not a package."""
    return runpy.run_path(str(ROOT / "scripts" / f"{name}.py"), run_name=name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_config_loads(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.work_dir.startswith("runs/")
    assert config.data.groups, "a config without task groups trains on nothing"


def test_stage1_has_the_reference_settings():
    config = load_config(STAGE1)
    optimizer = config.optimizer
    assert (optimizer.lr, optimizer.weight_decay, optimizer.warmup_steps) == (3e-5, 0.01, 2000)
    assert (optimizer.lr_schedule, optimizer.clip_grad_norm) == ("constant", 2.0)
    assert (config.batch.global_batch_size, config.batch.micro_batch_size) == (384, 4)
    assert config.max_steps == 80_000
    assert config.ema_decay == 0.9995
    assert config.checkpoint.every_steps == 5000
    assert (config.deepspeed.zero_stage, config.deepspeed.precision) == (2, "bf16")
    weights = config.objective.weights
    assert (weights.image, weights.text, weights.contrastive) == (1.0, 0.2, 0.05)
    assert (weights.align_image, weights.align_text) == (0.1, 0.1)
    assert config.objective.condition_dropout == 0.1


def test_stage3_models_text_with_full_weight():
    weights = load_config(ROOT / "configs" / "stage3_sft.py").objective.weights
    assert weights.text == 1.0
    assert weights.image == 1.0 and weights.contrastive == 0.05  # the rest of the base's weights survive the merge


@pytest.mark.parametrize("key", ["max_step", "optimizer.lrr", "objective.weights.txt"])
def test_unknown_key_is_an_error_naming_it(key):
    with pytest.raises(ConfigError, match=key.rsplit(".", 1)[-1]) as error:
        load_config(STAGE1, {key: 1})
    for section in key.split(".")[:-1]:
        assert section in str(error.value)


@pytest.mark.parametrize(
    "key, value", [("batch.micro_batch_size", "four"), ("deepspeed.zero_stage", 5), ("data.resolution", 1.5)]
)
def test_wrong_type_is_an_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(STAGE1, {key: value})


def test_dotted_overrides():
    config = load_config(
        STAGE1, {"optimizer.lr": parse_override("3e-4"), "work_dir": parse_override("runs/x"), "max_steps": 10}
    )
    assert config.optimizer.lr == 3e-4
    assert config.optimizer.warmup_steps == 2000  # siblings of an overridden key keep their values
    assert (config.work_dir, config.max_steps) == ("runs/x", 10)


def test_parse_override():
    assert parse_override("3e-4") == 3e-4 and isinstance(parse_override("3e-4"), float)
    assert parse_override("true") is True and parse_override("False") is False
    assert parse_override("none") is None
    assert parse_override("[1, 2]") == [1, 2]
    assert parse_override("runs/x") == "runs/x"


def test_gradient_accumulation_is_derived_from_the_global_batch():
    assert BatchConfig(global_batch_size=384, micro_batch_size=4).gradient_accumulation_steps(8) == 12
    with pytest.raises(ConfigError, match="change global_batch_size or micro_batch_size"):
        BatchConfig(global_batch_size=384, micro_batch_size=5).gradient_accumulation_steps(8)


def test_debug_config_fits_the_debug_assets(tmp_path):
    assets = load_script("make_debug_assets")["make_debug_assets"](tmp_path, size=32)
    assert sum(1 for _ in assets.t2i.open()) == assets.images

    config = load_config(ROOT / "configs" / "debug.py")
    local = [config.components.tokenizer, config.components.text_encoder, config.components.vae]
    local += [config.components.teacher] + [d["path"] for group in config.data.groups for d in group["datasets"]]
    for path in local:
        assert path.startswith(DEBUG_ASSETS + "/")
        assert (tmp_path / path.removeprefix(DEBUG_ASSETS + "/")).exists(), path

    components = load_tiny_components(assets.components)
    model, _ = build_transformer(config, components.t5.vocab_size)  # what the trainer builds
    assert "vocab_size" not in config.model.config  # it must follow the tokenizer, not a number
    assert model.config.vocab_size == components.t5.vocab_size
    assert model.config.joint_attention_dim == components.t5.hidden_size
    assert model.config.in_channels == model.config.out_channels == components.vae.latent_channels
    assert model.config.teacher_dim == components.teacher.dim


def test_launch_script_parses_and_explains_its_usage():
    script = ROOT / "train_unialignment.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert run.returncode != 0 and "usage" in run.stderr
    run = subprocess.run(["bash", str(script), "configs/missing.py"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and "config file not found: configs/missing.py" in run.stderr


def test_a_loaded_model_keeps_its_architecture(tmp_path):
    """Loading an export with another head count of the same total width would re-split its attention weights
    silently (the shapes match): it is refused, naming the field. The default image size may change."""
    debug = ROOT / "configs" / "debug.py"
    saved, _ = build_transformer(load_config(debug), vocab_size=40)
    saved.save_pretrained(tmp_path / "export")
    fields = dict(load_config(debug).model.config)

    def load(**changes):
        overrides = {"model.load_from": str(tmp_path / "export"), "model.config": {**fields, **changes}}
        return build_transformer(load_config(debug, overrides), vocab_size=40)

    loaded, source = load(sample_size=16)
    assert loaded.config.sample_size == 16 and "sample_size=16" in source
    pairs = zip(saved.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    with pytest.raises(ConfigError, match=r"model\.config\.(num_attention_heads|attention_head_dim)=4 but .*export"):
        load(num_attention_heads=4, attention_head_dim=4)
    with pytest.raises(ConfigError, match="num_head is not a UniAlignmentTransformer config field"):
        load(num_head=4)
