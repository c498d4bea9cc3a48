"""The trainer end to end on the debug config, through the real entry points: DeepSpeed on CPU (gloo), exact
resume, ZeRO-2 and ZeRO-3 with two processes, and a two-node torchrun launch on one machine."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unialignment.models import UniAlignmentTransformer

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = "configs/debug.py"
QUIET = ["--logging.sample_every_steps", "0"]


@pytest.fixture(scope="module", autouse=True)
def debug_assets():
    """The debug config's tiny components and shapes data (built once; the script reuses what exists)."""
    subprocess.run([sys.executable, "scripts/make_debug_assets.py"], cwd=REPO, check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(**extra) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return environment


def _run(command, timeout=600, **environment):
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_environment(**environment)
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _train(work_dir, *overrides):
    return _run([sys.executable, "scripts/train.py", DEBUG_CONFIG, "--work_dir", str(work_dir), *overrides])


def _torchrun(work_dir, nproc, *overrides):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        "scripts/train.py",
        DEBUG_CONFIG,
        "--work_dir",
        str(work_dir),
        *overrides,
    ]
    return _run(command)


def _metrics(work_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(work_dir) / "metrics.jsonl").read_text().splitlines()]


def _exported(work_dir, kind="raw") -> dict[str, torch.Tensor]:
    return load_file(Path(work_dir) / "export" / kind / "diffusion_pytorch_model.safetensors")


def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    # Samples are drawn mid-run only in the uninterrupted run: they must not disturb training's random state.
    _train(whole, "--max_steps", "4", "--checkpoint.every_steps", "2", "--logging.sample_every_steps", "2")
    _train(halves, "--max_steps", "2", "--checkpoint.every_steps", "2", *QUIET)
    resumed = _train(halves, "--max_steps", "4", "--checkpoint.every_steps", "2", *QUIET)
    assert "resumed from" in resumed.stdout and "step 2" in resumed.stdout

    uninterrupted, interrupted = _metrics(whole), _metrics(halves)
    assert [m["step"] for m in uninterrupted] == [m["step"] for m in interrupted] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, interrupted, strict=True):
        for term in ("loss/total", "loss/image", "loss/text", "loss/contrastive", "loss/align_image", "lr"):
            assert b[term] == pytest.approx(a[term], rel=1e-5, abs=1e-7), (a["step"], term)
    for kind in ("raw", "ema"):
        whole_weights, resumed_weights = _exported(whole, kind), _exported(halves, kind)
        assert whole_weights.keys() == resumed_weights.keys()
        for name, tensor in whole_weights.items():
            torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{kind} {name}")
    assert (whole / "samples" / "step_00000002" / "t2i.png").is_file()
    # Exports are ordinary transformer folders, loaded strictly; the run folder keeps its merged config.
    UniAlignmentTransformer.from_pretrained(whole / "export" / "ema")
    assert "work_dir" in (whole / "config.py").read_text()
    assert (whole / "checkpoints" / "latest").read_text() == "step_00000004"


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_processes_train_checkpoint_and_resume(tmp_path, zero_stage):
    work_dir = tmp_path / f"zero{zero_stage}"
    common = [
        "--deepspeed.zero_stage",
        str(zero_stage),
        "--optimizer.lr",
        "3e-3",
        "--optimizer.warmup_steps",
        "1",
        *QUIET,
    ]
    _torchrun(work_dir, 2, "--max_steps", "10", "--checkpoint.every_steps", "5", *common)
    metrics = _metrics(work_dir)
    first, last = metrics[:3], metrics[-3:]
    mean = lambda rows, term: sum(r[term] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss/text") < mean(first, "loss/text") - 0.3, metrics
    assert mean(last, "loss/total") < mean(first, "loss/total")
    assert sorted(p.name for p in (work_dir / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000010"]
    assert {p.name for p in (work_dir / "checkpoints" / "step_00000010").glob("rank_*.pt")} == {
        "rank_0.pt",
        "rank_1.pt",
    }
    UniAlignmentTransformer.from_pretrained(work_dir / "export" / "ema")

    resumed = _torchrun(work_dir, 2, "--max_steps", "12", "--checkpoint.every_steps", "5", *common)
    assert "resumed from" in resumed.stdout
    assert [m["step"] for m in _metrics(work_dir)][-2:] == [11, 12]
    assert (work_dir / "checkpoints" / "latest").read_text() == "step_00000012"


def _resumed_state(work_dir, nproc, *overrides) -> dict:
    """What `nproc` ranks hold right after resuming `work_dir` (tests/helpers/resumed_state.py): each parameter's fp32
    weight and AdamW moments, the EMA, the step, the learning rate and the sampler's state."""
    out = Path(work_dir).parent / f"resumed_on_{nproc}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(_free_port()), "tests/helpers/resumed_state.py", DEBUG_CONFIG, str(out), "--work_dir", str(work_dir),
        *QUIET, *overrides,
    ]  # fmt: skip
    _run(command)
    state = torch.load(out / "state.pt", weights_only=False)
    state["parameters"] = {
        folder.name: {
            kind: torch.load(folder / f"{kind}.pt", weights_only=False)["param"]
            for kind in KINDS
            if (folder / f"{kind}.pt").is_file()  # buffers (the position table) have no moments
        }
        for folder in (out / "resumed" / "universal" / "zero").iterdir()
        if folder.is_dir()
    }
    return state


KINDS = ("fp32", "exp_avg", "exp_avg_sq")


@pytest.mark.parametrize(("saved", "resumed"), [(2, 1), (1, 2)])
def test_resuming_on_another_number_of_ranks_restores_the_whole_state(tmp_path, saved, resumed):
    """A checkpoint of `saved` ranks resumed on `resumed` through DeepSpeed's universal checkpoint holds, number for
    number, what resuming it on `saved` ranks holds: every fp32 weight and AdamW moment, the EMA, the step, the
    learning rate and the data order. Then training goes on, and another global batch is refused."""
    run = tmp_path / "run"
    steps = ["--max_steps", "2", "--checkpoint.every_steps", "2"]
    (_torchrun if saved > 1 else lambda work_dir, n, *o: _train(work_dir, *o))(run, saved, *QUIET, *steps)

    same = _resumed_state(run, saved, *steps)
    other = _resumed_state(run, resumed, *steps)
    assert (run / "checkpoints" / "step_00000002" / "universal" / "zero").is_dir()
    assert other["step"] == same["step"] == 2 and other["lr"] == same["lr"]
    assert other["sampler"]["cursors"] == same["sampler"]["cursors"]
    assert same["parameters"].keys() == other["parameters"].keys()
    for name, tensors in same["parameters"].items():
        for kind, value in tensors.items():
            assert torch.equal(other["parameters"][name][kind], value), (name, kind)
    assert any(tensors["exp_avg"].abs().sum() > 0 for tensors in same["parameters"].values())
    assert same["ema"].keys() == other["ema"].keys()
    assert all(torch.equal(other["ema"][name], value) for name, value in same["ema"].items())

    continued = ["--max_steps", "4", "--checkpoint.every_steps", "2", *QUIET]
    (_torchrun if resumed > 1 else lambda work_dir, n, *o: _train(work_dir, *o))(run, resumed, *continued)
    records = [r for r in _metrics(run) if "loss/total" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss/total"]) for r in records)

    with pytest.raises(AssertionError, match="global batch of 8 samples per step"):
        _train(run, *QUIET, "--max_steps", "6", "--batch.global_batch_size", "4")


def test_two_nodes_on_one_machine_through_the_launch_script(tmp_path):
    port = str(_free_port())
    nodes = []
    for node_rank in ("0", "1"):
        command = [
            "bash",
            "train_unialignment.sh",
            DEBUG_CONFIG,
            "--work_dir",
            str(tmp_path),
            "--max_steps",
            "2",
            *QUIET,
        ]
        environment = _environment(
            NNODES="2", NODE_RANK=node_rank, NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        nodes.append(
            subprocess.Popen(
                command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n\n".join(output[-3000:] for output in outputs)
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2]
    assert {p.name for p in (tmp_path / "checkpoints" / "step_00000002").glob("rank_*.pt")} == {
        "rank_0.pt",
        "rank_1.pt",
    }


def test_lora_trains_adapters_only_and_saves_them_on_their_own(tmp_path):
    _train(tmp_path, "--max_steps", "2", "--model.lora_rank", "4", *QUIET)
    for kind in ("raw", "ema"):
        adapters = load_file(tmp_path / "export" / kind / "pytorch_lora_weights.safetensors")
        assert adapters and all("lora_A" in name or "lora_B" in name for name in adapters)
        assert not (tmp_path / "export" / kind / "diffusion_pytorch_model.safetensors").exists()
    model = UniAlignmentTransformer.from_config(UniAlignmentTransformer.load_config(tmp_path / "export" / "raw"))
    model.load_lora_adapter(
        tmp_path / "export" / "raw", weight_name="pytorch_lora_weights.safetensors", adapter_name="run"
    )
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    command = [
        sys.executable,
        "scripts/train.py",
        DEBUG_CONFIG,
        "--work_dir",
        str(tmp_path),
        "--max_steps",
        "10",
        "--objective.weights.align_text",
        "nan",
        "--max_nonfinite_in_a_row",
        "3",
        *QUIET,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=_environment())
    assert result.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss or gradient" in result.stdout + result.stderr
    assert [m["skipped_steps"] for m in _metrics(tmp_path)] == [1, 2, 3]
