"""`inference.py` and `scripts/export_pipeline.py` end to end, in subprocesses, on a tiny pipeline saved once.

A subprocess costs several seconds of start-up, so one `--jobs` run covers every task and most checks."""

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from mmengine.config import Config
from PIL import Image
from transformers import T5EncoderModel

from unialignment.errors import UserError
from unialignment.frozen.text_encoder import load_t5_tokenizer, mask_token_id
from unialignment.pipelines import UniAlignmentPipeline
from unialignment.toy.components import make_tiny_components
from unialignment.toy.shapes import ShapeScene, draw_scene
from unialignment.toy.transformer import make_tiny_transformer
from unialignment.training.checkpoint import point_export, tag_for_step
from unialignment.training.config import ComponentsConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size", "32", "--steps", "2"]


def _run(*arguments: str, script: str = "inference.py") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *map(str, arguments)], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _assert_png(path: Path, size: int = 32) -> None:
    with Image.open(path) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (size, size), "RGB")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny pipeline, a run folder as the trainer leaves it (merged config.py and export/), and images."""
    root = tmp_path_factory.mktemp("inference")
    folders = make_tiny_components(root / "components")
    tokenizer = load_t5_tokenizer(folders.tokenizer)
    transformer = make_tiny_transformer(
        in_channels=4, out_channels=4, joint_attention_dim=32, vocab_size=len(tokenizer), teacher_dim=32
    )
    pipe = UniAlignmentPipeline(
        transformer,
        FlowMatchEulerDiscreteScheduler(),
        AutoencoderKL.from_pretrained(folders.vae),
        T5EncoderModel.from_pretrained(folders.text_encoder),
        tokenizer,
    )
    pipe.save_pretrained(root / "pipeline")

    run = root / "run"
    mask_embedding = root / "mask_embedding.pth"
    torch.save(torch.randn(32), mask_embedding)
    components = ComponentsConfig(
        tokenizer=str(folders.tokenizer),
        text_encoder=str(folders.text_encoder),
        vae=str(folders.vae),
        mask_embedding=str(mask_embedding),
        text_length=20,
        dtype="float32",
    )
    run.mkdir()
    merged = TrainConfig(work_dir=str(run), components=components).to_dict()
    Config(merged).dump(str(run / "config.py"))  # as the trainer leaves a run folder: the mmengine file
    (run / "config.json").write_text(json.dumps(merged))  # and the JSON that readers read
    tag = tag_for_step(2)
    transformer.save_pretrained(run / "export" / tag / "ema")
    make_tiny_transformer(
        seed=1, in_channels=4, out_channels=4, joint_attention_dim=32, vocab_size=len(tokenizer), teacher_dim=32
    ).save_pretrained(run / "export" / tag / "raw")
    point_export(run, tag)

    images = root / "images"
    images.mkdir()
    draw_scene(ShapeScene("red", "square", "left")).save(images / "red.png")
    draw_scene(ShapeScene("blue", "circle", "middle")).save(images / "blue.png")
    (images / "broken.png").write_bytes(b"not a png")
    return SimpleNamespace(root=root, pipeline=root / "pipeline", run=run, images=images, mask=mask_embedding)


def test_jobs_run_every_task_and_report_bad_lines(tiny):
    folder = tiny.root / "jobs"
    folder.mkdir()
    red, blue = tiny.images / "red.png", tiny.images / "blue.png"
    jobs = [
        {"task": "t2i", "prompt": ["a red square on the left", "a blue circle"], "num_images": 2, "output": "t2i"},
        {"task": "t2i", "prompt": "a red square on the left", "seed": 7, "output": "seeded.png"},
        {"task": "edit", "image": str(red), "instruction": "Make the square green.", "output": "edit.png"},
        {"task": "perception", "image": str(red), "map": "depth", "output": "depth/"},
        {"task": "compose", "images": [str(red), str(blue)], "instruction": "Put them together.", "output": "c.png"},
        {"task": "caption", "image": str(blue), "length": 8, "output": "caption.txt"},
        {"task": "vqa", "image": str(blue), "question": "What colour is the circle?", "length": 8, "output": "a.jsonl"},
        {"task": "edit", "image": "missing.png", "instruction": "Make it red.", "output": "never.png"},  # line 8
        {"task": "edit", "image": str(tiny.images / "broken.png"), "instruction": "Recolour.", "output": "no.png"},
    ]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs) + "not json\n")

    result = _run("--model", tiny.pipeline, "--jobs", folder / "jobs.jsonl", "--seed", "0", *FAST)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert f"jobs.jsonl:8: error: argument --image: no such file: {folder / 'missing.png'}" in result.stderr
    assert "jobs.jsonl:9: error: cannot read image" in result.stderr and "broken.png" in result.stderr
    assert "jobs.jsonl:10: error: not a JSON object" in result.stderr
    assert "3 of 10 job(s) failed" in result.stderr
    assert not (folder / "never.png").exists() and not (folder / "no.png").exists()

    assert sorted(p.name for p in (folder / "t2i").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    for path in [*(folder / "t2i").iterdir(), folder / "seeded.png", folder / "edit.png", folder / "c.png"]:
        _assert_png(path)
    _assert_png(folder / "depth" / "00000.png")
    assert (folder / "caption.txt").read_text().strip()
    answer = json.loads((folder / "a.jsonl").read_text())
    assert answer["question"] == "What colour is the circle?" and answer["text"].strip()
    assert not list(folder.rglob("*.tmp"))

    # The same seeded job from the command line, in another process, gives the same bytes.
    single = tiny.root / "single" / "seeded.png"
    prompt = jobs[1]["prompt"]
    _ok(_run("t2i", "--model", tiny.pipeline, "--prompt", prompt, "--seed", "7", "--output", single, *FAST))
    assert single.read_bytes() == (folder / "seeded.png").read_bytes()


def test_batched_jobs_keep_their_seeds_and_blame_only_the_bad_one(tiny, capsys):
    """`--batch-size`: jobs share pipeline calls, yet each output is the one its job gets alone, and an error inside
    a batch is reported against its own job while the others still run."""
    cli = runpy.run_path(str(REPO / "inference.py"), run_name="inference")
    pipe = UniAlignmentPipeline.from_pretrained(tiny.pipeline)
    pipe.set_progress_bar_config(disable=True)
    red, blue = (Image.open(tiny.images / name).convert("RGB") for name in ("red.png", "blue.png"))
    edits = [(red, "Make the square green."), (blue, "   "), (blue, "Make it red."), (red, "Move it right.")]

    def calls(folder: Path) -> list:
        common = dict(height=32, width=32, num_inference_steps=2)
        image_options = dict(common, guidance_scale=9.0, negative_prompt=None, num_images_per_prompt=1)
        jobs = []
        for seed, (image, instruction) in enumerate(edits):  # the "   " instruction fails in the pipeline
            kwargs = dict(image_options, image=image, instruction=instruction, generator=_seeded(seed))
            jobs.append((f"edit:{seed}", cli["Call"]("edit", kwargs, folder / f"{seed}.png", {})))
        for seed, image in enumerate([red, blue, red]):
            kwargs = dict(common, image=image, length=8, generator=_seeded(seed))
            jobs.append((f"caption:{seed}", cli["Call"]("caption", kwargs, folder / f"{seed}.txt", {})))
        return jobs

    alone, batched = tiny.root / "alone", tiny.root / "batched"
    assert cli["run_jobs"](pipe, calls(alone), batch_size=1) == 1
    capsys.readouterr()
    # pairs: edits 0+1 fail together and rerun one by one, edits 2+3 and captions 0+1 share calls, caption 2 alone
    assert cli["run_jobs"](pipe, calls(batched), batch_size=2) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("edit:1: error:") and "empty" in errors[0]
    for seed in (0, 2, 3):
        expected, actual = (np.asarray(Image.open(folder / f"{seed}.png"), dtype=int) for folder in (alone, batched))
        assert np.abs(expected - actual).max() <= 1  # batched arithmetic may round one level differently
    assert not (batched / "1.png").exists()
    for seed in range(3):
        assert (batched / f"{seed}.txt").read_text() == (alone / f"{seed}.txt").read_text()


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_caption_from_a_run_folder_to_stdout(tiny):
    result = _ok(_run("caption", "--model", tiny.run, "--image", tiny.images / "blue.png", "--length", "8", *FAST))
    assert result.stdout.strip()


@pytest.mark.parametrize(
    "arguments, message",
    [
        # The tiny pipeline's VAE downsamples by 4 and its patch is 2: sides are multiples of 8, read from the model.
        (["t2i", "--prompt", "a red square", "--size", "30"], "multiples of 8"),
        (["t2i", "--prompt", "   "], "argument --prompt: must not be empty"),
        (["edit", "--image", "missing.png", "--instruction", "Make it red."], "no such file: missing.png"),
        (["edit", "--image", "{images}/broken.png", "--instruction", "Make it red."], "cannot read image"),
        (["t2i", "--prompt", "a", "--num-images", "2"], "is one file but this makes 2 images"),
    ],
)
def test_user_mistakes_exit_2_with_one_error_line(tiny, arguments, message):
    arguments = [a.format(images=tiny.images) for a in arguments]
    output = tiny.root / "mistakes" / "out.png"
    result = _run(*arguments, "--model", tiny.pipeline, "--output", output)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert not output.parent.exists()


def test_export_pipeline_from_a_run(tiny, capsys):
    out = tiny.root / "exported"
    _ok(_run("--run", tiny.run, "--out", out, script="scripts/export_pipeline.py"))
    assert (out / "mask_token_emb.00-of-01.pth").is_file()
    pipe = UniAlignmentPipeline.from_pretrained(out)
    expected = UniAlignmentPipeline.from_pretrained(tiny.pipeline).transformer.state_dict()  # the same EMA weights
    assert all(torch.equal(tensor, expected[name]) for name, tensor in pipe.transformer.state_dict().items())
    mask_row = pipe.text_encoder.get_input_embeddings().weight[mask_token_id(pipe.tokenizer)]
    assert torch.equal(mask_row, torch.load(tiny.mask, weights_only=True))
    assert pipe.tokenizer.model_max_length == 20  # prompts are encoded at the run's training length

    export = runpy.run_path(str(REPO / "scripts" / "export_pipeline.py"), run_name="export_pipeline")["main"]
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as refused:
        export(["--run", str(tiny.run), "--out", str(out)])
    assert refused.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before

    export(["--run", str(tiny.run), "--weights", "raw", "--out", str(out), "--overwrite"])
    raw = UniAlignmentPipeline.from_pretrained(out).transformer.state_dict()
    assert not all(torch.equal(tensor, expected[name]) for name, tensor in raw.items())
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_an_unwritable_output_fails_its_own_job_only(tiny, tmp_path):
    """Checked before generating: an output under a file, or in a folder nothing can be written to (/proc, even for
    root), fails its line; the other jobs run and the summary counts the failures."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    jobs = [
        {"task": "caption", "image": str(tiny.images / "blue.png"), "length": 8, "output": str(blocker / "x.txt")},
        {"task": "caption", "image": str(tiny.images / "blue.png"), "length": 8, "output": str(tmp_path / "ok.txt")},
        {"task": "t2i", "prompt": "a red square", "output": "/proc/unialignment.png"},
    ]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    result = _run("--model", tiny.pipeline, "--jobs", tmp_path / "jobs.jsonl", "--seed", "0", *FAST)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-4000:]
    assert f"jobs.jsonl:1: error: --output {blocker / 'x.txt'}: {blocker} is a file, not a folder" in result.stderr
    assert "jobs.jsonl:3: error: --output /proc/unialignment.png: cannot write in /proc" in result.stderr
    assert "2 of 3 job(s) failed" in result.stderr
    assert (tmp_path / "ok.txt").read_text().strip()

    single = _run("t2i", "--model", tiny.pipeline, "--prompt", "a red square", "--output", "/proc/x.png", *FAST)
    assert single.returncode == 2 and "Traceback" not in single.stderr
    (line,) = [line for line in single.stderr.splitlines() if "error:" in line]
    assert "cannot write in /proc" in line

    # A write that fails after the generation (the folder went away meanwhile) fails that job alone.
    cli = runpy.run_path(str(REPO / "inference.py"), run_name="inference")
    pipe = UniAlignmentPipeline.from_pretrained(tiny.pipeline)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(tiny.images / "red.png").convert("RGB")
    kwargs = dict(image=image, length=8, height=32, width=32, num_inference_steps=2, generator=_seeded(0))
    calls = [
        ("gone", cli["Call"]("caption", dict(kwargs), Path("/proc/gone/x.txt"), {})),
        ("kept", cli["Call"]("caption", dict(kwargs, generator=_seeded(0)), tmp_path / "kept.txt", {})),
    ]
    assert cli["run_jobs"](pipe, calls, batch_size=1) == 1
    assert (tmp_path / "kept.txt").is_file()


def test_reading_a_model_or_run_folder_runs_none_of_its_code(tiny, tmp_path):
    marker = tmp_path / "PWNED"
    probe = f"__import__('pathlib').Path({str(marker)!r}).touch()\n"
    run = tmp_path / "run"
    shutil.copytree(tiny.run, run, symlinks=True)
    (run / "config.py").write_text(probe + (run / "config.py").read_text())  # an mmengine config is Python
    _ok(_run("caption", "--model", run, "--image", tiny.images / "blue.png", "--length", "8", *FAST))
    _ok(_run("--run", run, "--out", tmp_path / "exported", script="scripts/export_pipeline.py"))
    assert not marker.exists()

    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny.pipeline, pipeline)
    (pipeline / "evil_pipeline.py").write_text(probe + "class EvilPipeline:\n    pass\n")
    (pipeline / "text_encoder" / "evil_model.py").write_text(probe + "class EvilModel:\n    pass\n")
    encoder_config = json.loads((pipeline / "text_encoder" / "config.json").read_text())
    encoder_config["auto_map"] = {"AutoModel": "evil_model.EvilModel"}
    (pipeline / "text_encoder" / "config.json").write_text(json.dumps(encoder_config))
    index = json.loads((pipeline / "model_index.json").read_text())
    index.update(_class_name=["evil_pipeline", "EvilPipeline"], safety_checker=["evil_pipeline", "EvilPipeline"])
    (pipeline / "model_index.json").write_text(json.dumps(index))
    assert type(UniAlignmentPipeline.from_pretrained(pipeline)) is UniAlignmentPipeline
    assert not marker.exists()

    index["vae"] = ["os", "system"]
    (pipeline / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"names vae = \['os', 'system'\]"):
        UniAlignmentPipeline.from_pretrained(pipeline)
    assert not marker.exists()
