"""Attacks a hostile user would try, each once a silent wrong result, a dead long job or a traceback: non-finite
steps on every ZeRO stage, stale feature caches, a lone surrogate in a caption, unwritable outputs, jobs files with
U+2028, config and data mistakes, a full disk, a hostile pickle, code in a run folder, and the run folder's
bookkeeping after a resume (metrics, TensorBoard, exports)."""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unialignment.data.jsonl_index import JsonlIndex
from unialignment.data.records import TaskKind
from unialignment.pipelines.jobs import DEFAULTS, read_jobs

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = "configs/debug.py"
QUIET = ["--logging.sample_every_steps", "0"]


@pytest.fixture(scope="module", autouse=True)
def debug_assets():
    subprocess.run([sys.executable, "scripts/make_debug_assets.py"], cwd=REPO, check=True, capture_output=True)


def _environment() -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**environment, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(command, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_environment(), **kwargs
    )


def _train(work_dir, *overrides, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/train.py", DEBUG_CONFIG, "--work_dir", str(work_dir), *QUIET, *overrides]
    return _run(command, **kwargs)


def _metrics(work_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(work_dir) / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with status 2 and said why in exactly one `error:` line, without a traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-4000:]
    return lines[0]


# --- silent wrong results ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_non_finite_steps_are_skipped_on_every_zero_stage_and_no_weight_changes(tmp_path, zero_stage):
    """Every step's loss is NaN: each is skipped and counted, and the exported weights are the initial ones."""
    common = ["--deepspeed.zero_stage", str(zero_stage), "--max_nonfinite_in_a_row", "10", "--ema_decay", "0.5"]
    start = _train(tmp_path / "start", *common, "--max_steps", "1", "--optimizer.lr", "0")
    assert start.returncode == 0, start.stderr[-4000:]
    result = _train(tmp_path / "nan", *common, "--max_steps", "3", "--objective.weights.align_text", "nan")
    assert result.returncode == 0, result.stderr[-4000:]
    assert [m["skipped_steps"] for m in _metrics(tmp_path / "nan")] == [1, 2, 3]
    initial = load_file(tmp_path / "start" / "export" / "raw" / "diffusion_pytorch_model.safetensors")
    for kind in ("raw", "ema"):
        exported = load_file(tmp_path / "nan" / "export" / kind / "diffusion_pytorch_model.safetensors")
        for name, tensor in exported.items():
            assert torch.isfinite(tensor).all(), (kind, name)
            torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0, msg=f"{kind} {name}")


def _cache_data(tmp_path: Path) -> list[str]:
    """A copy of the debug assets' text-to-image and edit files; the overrides that point a config at them."""
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(REPO / "runs" / "debug_assets" / "data"), str(data)], check=True)
    groups = [
        {"name": "t2i", "weight": 1, "datasets": [{"path": str(data / "t2i.jsonl"), "task": "t2i"}]},
        {"name": "edit", "weight": 1, "datasets": [{"path": str(data / "edit.jsonl"), "task": "edit"}]},
    ]
    return ["--data.groups", json.dumps(groups), "--components.dtype", "float32"]


def _online_and_cached_batches(overrides: list[str]):
    """(task groups, the cache-reading dataset, [(online batch, cached batch)] for two sampled steps): the same
    records prepared from the frozen components and from the cache the config's files have."""
    from unialignment.data.collate import Collator
    from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
    from unialignment.data.feature_cache import components_fingerprint
    from unialignment.data.features import prepare_training_batch
    from unialignment.data.sampler import TaskMixingSampler
    from unialignment.frozen.components import load_frozen_components
    from unialignment.training.config import load_config, parse_overrides

    config = load_config(REPO / DEBUG_CONFIG, parse_overrides(overrides))
    components = load_frozen_components(config.components)
    task_groups = build_task_groups(config.data.groups, config.data.resolution, size_multiple=8, progress=False)
    fingerprint = components_fingerprint(components)
    online_dataset = UniAlignmentDataset(task_groups)
    cached_dataset = UniAlignmentDataset(task_groups, use_feature_cache=True, components_fingerprint=fingerprint)
    assert all(readers is not None for readers in cached_dataset.cache_readers)
    collator = Collator(components.t5.tokenizer, components.t5.max_length)
    sampler = TaskMixingSampler([g.pool_sizes for g in task_groups], [1, 1], 2, num_steps=2, seed=3)
    pairs = []
    for keys in sampler:
        online, cached_batch = collator([online_dataset[k] for k in keys]), collator([cached_dataset[k] for k in keys])
        a = prepare_training_batch(online, components, torch.Generator().manual_seed(0), "cpu")
        b = prepare_training_batch(cached_batch, components, torch.Generator().manual_seed(0), "cpu")
        pairs.append((a, b))
    return task_groups, cached_dataset, pairs


CACHED_FEATURES = ("prompt_embeds", "teacher_image_targets", "teacher_text_targets", "target_latents")


def test_the_cache_script_builds_what_training_computes_for_non_default_settings(tmp_path):
    settings = ["--components.text_length", "16", "--components.teacher_average_padding", "false"]
    overrides = [*settings, *_cache_data(tmp_path)]
    cached = _run([sys.executable, "scripts/cache_features.py", DEBUG_CONFIG, *overrides])
    assert cached.returncode == 0, cached.stderr[-4000:]

    from unialignment.data.sampler import SampleKey

    task_groups, cached_dataset, pairs = _online_and_cached_batches(overrides)
    for a, b in pairs:
        for name in CACHED_FEATURES:
            # stored in bfloat16: the cache's rounding, nothing more
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=0.05, rtol=0.02, msg=name)

    # An image file that changed after the cache was written: its row is not read from the cache but replaced by
    # another sample, and the replacement says why.
    record = task_groups[0].indexes[0].read_record(0)
    os.utime(record.target_image, ns=(1, 1))
    position = int((task_groups[0].pool_members[0] == 0).nonzero()[0][0])
    sample = cached_dataset[SampleKey(group=0, bucket=0, index=position, step=0, micro_step=0)]
    assert sample.replaced and "changed after the feature cache was written" in sample.replaced[0]


def test_a_float32_cache_is_what_training_computes_and_skip_fresh_keeps_it(tmp_path):
    """What the shapes-world demo runs before each stage: `--storage-dtype float32 --skip-fresh`."""
    from unialignment.data.feature_cache import cache_folder

    overrides = _cache_data(tmp_path)
    command = [sys.executable, "scripts/cache_features.py", DEBUG_CONFIG, *overrides, "--skip-fresh"]
    first = _run([*command, "--storage-dtype", "float32"])
    assert first.returncode == 0, first.stderr[-4000:]
    assert first.stdout.count("records cached in") == 2, first.stdout
    task_groups, _, pairs = _online_and_cached_batches(overrides)
    for a, b in pairs:
        for name in CACHED_FEATURES:
            # float32 storage: only the rounding of encoding records in other batches (measured: 2e-7 relative)
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-5, msg=name)

    metas = [cache_folder(group.indexes[0].path, 32) / "meta.json" for group in task_groups]
    written = [meta.stat().st_mtime_ns for meta in metas]
    again = _run([*command, "--storage-dtype", "float32"])
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("its feature cache is fresh; kept") == 2, again.stdout
    assert [meta.stat().st_mtime_ns for meta in metas] == written
    # another storage dtype, or a changed file, is not fresh: rewritten
    os.utime(tmp_path / "data" / "t2i.jsonl", ns=(1, 1))
    other = _run([*command, "--storage-dtype", "float32"])
    assert other.returncode == 0, other.stderr[-4000:]
    lines = other.stdout.splitlines()
    assert any("t2i.jsonl: " in line and "records cached in" in line for line in lines), other.stdout
    assert any("edit.jsonl: its feature cache is fresh; kept" in line for line in lines), other.stdout
    bfloat16 = _run([*command, "--storage-dtype", "bfloat16"])
    assert bfloat16.stdout.count("records cached in") == 2, bfloat16.stdout
    assert all(json.loads(meta.read_text())["storage_dtype"] == "torch.bfloat16" for meta in metas)


# --- one line must not kill a long job ----------------------------------------------------------------------------


def test_a_caption_that_is_not_valid_utf8_is_a_skipped_line(tmp_path):
    image = next((REPO / "runs" / "debug_assets" / "data" / "images").glob("*.png"))
    (tmp_path / "a.png").write_bytes(image.read_bytes())
    turns = [{"from": "human", "value": "a red square"}, {"from": "gpt", "value": "<image>"}]
    good = {"image": ["a.png"], "conversations": turns}
    lines = [json.dumps(good), json.dumps(good).replace("a red square", "\\ud800 a red square"), json.dumps(good)]
    (tmp_path / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    index = JsonlIndex.build_or_load(tmp_path / "t2i.jsonl", TaskKind.TEXT_TO_IMAGE, progress=False)
    assert len(index) == 2
    (report,) = index.skip_report()
    assert report.startswith(f"{tmp_path / 't2i.jsonl'}:2: ") and "lone surrogate" in report


def test_jobs_lines_split_on_newlines_only(tmp_path):
    """U+2028 is a line separator to str.splitlines() but a plain character inside a JSON string."""
    jobs = tmp_path / "jobs.jsonl"
    first = json.dumps({"task": "t2i", "prompt": "a red\u2028square", "output": "a.png"}, ensure_ascii=False)
    jobs.write_text(first + "\n" + "not json\n", encoding="utf-8")
    (one, two) = read_jobs(jobs, {k: v for k, v in DEFAULTS.items() if k not in ("command", "jobs")})
    assert one[0] == f"{jobs}:1" and one[1]["prompt"] == ["a red\u2028square"]
    assert two[0] == f"{jobs}:2" and "not a JSON object" in str(two[1])


# --- errors as one line, exit status 2 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--batch.micro_batch_size", "3"], "is not a multiple of micro_batch_size"),
        (["--no_such_key", "1"], "unknown key(s) ['no_such_key']"),
        (["--components.vae", "/nonexistent/vae"], "/nonexistent/vae"),
        (["--checkpoint.every_steps", "0"], "checkpoint.every_steps=0 is out of range"),
        (["--batch.micro_batch_size", "0"], "batch.micro_batch_size=0 is out of range"),
        (["--max_steps", "0"], "max_steps=0 is out of range"),
        (["--max_steps", "-5"], "max_steps=-5 is out of range"),
        (["--data.resolution", "4096"], "covers at most 128 px"),
        (["--work_dir", "/proc/unialignment_run"], "the run folder /proc/unialignment_run cannot be written"),
    ],
)
def test_mistakes_are_one_line_and_status_2_through_the_launcher(tmp_path, overrides, message):
    command = ["bash", "train_unialignment.sh", DEBUG_CONFIG, "--work_dir", str(tmp_path / "run"), *overrides]
    result = _run(command, timeout=300)
    assert message in _one_error_line(result)


def test_too_many_bad_lines_and_a_hostile_mask_embedding_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n" * 5)
    groups = json.dumps([{"name": "t2i", "weight": 1, "datasets": [{"path": str(bad), "task": "t2i"}]}])
    result = _train(tmp_path / "run", "--data.groups", groups)
    assert "more than 1.00% of the lines are bad" in _one_error_line(result)
    assert f"{bad}:1: malformed JSON" in result.stderr  # the first reasons follow the error line

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    evil = tmp_path / "mask_token_emb.00-of-01.pth"
    torch.save({"mask": Hostile()}, evil)
    result = _train(tmp_path / "run2", "--components.mask_embedding", str(evil))
    line = _one_error_line(result)
    assert str(evil) in line and "not a tensor file that loads safely" in line
    assert not (tmp_path / "PWNED").exists()


def test_a_full_disk_names_the_checkpoint_and_leaves_no_partial_folder(tmp_path):
    """A file-size limit stands in for a full disk: the checkpoint's files cannot be written."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    work_dir = tmp_path / "run"
    result = _train(work_dir, "--max_steps", "2", "--checkpoint.every_steps", "2", preexec_fn=limit_file_size)
    line = _one_error_line(result)
    assert f"checkpoint step_00000002 could not be written to {work_dir / 'checkpoints' / 'step_00000002'}" in line
    assert "The last complete checkpoint is none" in line
    assert not (work_dir / "checkpoints" / "step_00000002").exists()
    assert not (work_dir / "export" / "step_00000002").exists()


# --- bookkeeping after a resume -------------------------------------------------------------------------------------


def test_a_resume_records_each_step_once_and_prunes_exports_with_checkpoints(tmp_path):
    work_dir = tmp_path / "run"
    common = ["--checkpoint.every_steps", "2", "--checkpoint.keep_last", "1"]
    assert _train(work_dir, "--max_steps", "4", *common).returncode == 0
    # The run died after logging steps 3 and 4 but before checkpoint 4 was complete.
    subprocess.run(["rm", "-rf", str(work_dir / "checkpoints" / "step_00000004")], check=True)
    (work_dir / "checkpoints" / "latest").write_text("step_00000002")
    resumed = _train(work_dir, "--max_steps", "6", *common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [m["step"] for m in _metrics(work_dir)] == [1, 2, 3, 4, 5, 6]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]

    assert sorted(p.name for p in (work_dir / "checkpoints").glob("step_*")) == ["step_00000006"]
    assert sorted(p.name for p in (work_dir / "export").glob("step_*")) == ["step_00000006"]
    assert os.readlink(work_dir / "export" / "ema") == "step_00000006/ema"


def test_the_export_links_move_only_after_latest(tmp_path):
    """A crash between `latest` and the export links leaves the links behind the checkpoint, never past it."""
    work_dir = tmp_path / "run"
    driver = (
        "import sys, runpy\n"
        "import unialignment.training.checkpoint as ckpt\n"
        "def crash(*args):\n"
        "    raise SystemExit(9)\n"
        "ckpt.point_export = crash\n"
        f"sys.argv = ['scripts/train.py', {DEBUG_CONFIG!r}, '--work_dir', {str(work_dir)!r}, '--max_steps', '2',"
        " '--checkpoint.every_steps', '2', '--logging.sample_every_steps', '0']\n"
        "runpy.run_path('scripts/train.py', run_name='__main__')\n"
    )
    result = _run([sys.executable, "-c", driver])
    assert result.returncode == 9, result.stderr[-4000:]
    assert (work_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (work_dir / "export" / "ema").exists()


# --- a kill -9 while saving ------------------------------------------------------------------------------------------


def test_a_run_killed_while_saving_resumes_to_the_uninterrupted_weights(tmp_path):
    common = ["--max_steps", "6", "--checkpoint.every_steps", "2"]
    whole = tmp_path / "whole"
    assert _train(whole, *common).returncode == 0
    expected = load_file(whole / "export" / "ema" / "diffusion_pytorch_model.safetensors")
    for attempt, delay in enumerate((0.0, 0.15)):
        work_dir = tmp_path / f"killed{attempt}"
        command = [sys.executable, "scripts/train.py", DEBUG_CONFIG, "--work_dir", str(work_dir), *QUIET, *common]
        process = subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=subprocess.DEVNULL)
        target = work_dir / "checkpoints" / "step_00000004"  # the second checkpoint, being written
        while process.poll() is None and not target.exists():
            time.sleep(0.005)
        time.sleep(delay)
        process.kill()
        process.wait()
        resumed = _train(work_dir, *common)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        weights = load_file(work_dir / "export" / "ema" / "diffusion_pytorch_model.safetensors")
        for name, tensor in expected.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=f"delay {delay}: {name}")
