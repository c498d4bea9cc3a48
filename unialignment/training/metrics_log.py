"""Where a run's numbers go, on rank 0 only: `metrics.jsonl` (one record per step), the tracker (TensorBoard, or
Weights & Biases with `logging.tracker="wandb"`: the same scalars, images and texts), the tqdm bar and, every
`logging.every_steps`, a line in `train.log` with the step of the total and the estimated time left."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from unialignment.errors import UserError
from unialignment.files import atomic_path

logger = logging.getLogger("unialignment.train")


class TensorBoardTracker:
    def __init__(self, work_dir: Path, first_step: int, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # imported where used: tensorboard is slow to import

        # purge_step: the events an interrupted run wrote past its checkpoint are dropped when read back.
        self.writer = SummaryWriter(work_dir / "tensorboard", purge_step=first_step + 1)

    def scalars(self, record: dict[str, float], step: int) -> None:
        for name, value in record.items():
            self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)

    def image(self, name: str, image: Image.Image, step: int) -> None:
        self.writer.add_image(name, np.asarray(image), step, dataformats="HWC")

    def text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Weights & Biases, an optional extra (`pip install wandb`): the same scalars, images and texts."""

    def __init__(self, work_dir: Path, first_step: int, run_name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("logging.tracker='wandb' needs Weights & Biases: pip install wandb") from None
        self.wandb = wandb
        self.run = wandb.init(project="unialignment", name=run_name, dir=str(work_dir), config=config, resume="allow")

    def scalars(self, record: dict[str, float], step: int) -> None:
        self.run.log({name if "/" in name else f"train/{name}": value for name, value in record.items()}, step=step)

    def image(self, name: str, image: Image.Image, step: int) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def text(self, name: str, text: str, step: int) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class MetricsLog:
    """Open on every rank; only the main rank writes. Use as a context manager so the files are closed.

    A run that resumes at `first_step` drops the records of later steps that an interrupted run left behind (from
    `metrics.jsonl`, and from TensorBoard through its `purge_step`), so every step is recorded once."""

    def __init__(
        self,
        work_dir: Path,
        is_main: bool,
        total_steps: int,
        first_step: int,
        log_every: int,
        tracker: str = "tensorboard",
        config: dict | None = None,
    ):
        self.is_main, self.log_every, self.total_steps, self.work_dir = is_main, log_every, total_steps, work_dir
        self.first_step, self.started = first_step, time.monotonic()
        self.tracker = self.metrics_file = None
        if is_main:
            self.tracker = TRACKERS[tracker](work_dir, first_step, work_dir.name, config or {})
            metrics_path = work_dir / "metrics.jsonl"
            for path in (metrics_path, work_dir / "validation.jsonl"):
                _keep_records_up_to(path, first_step)
            self.metrics_file = open(metrics_path, "a")  # noqa: SIM115 (closed in close())
        self.progress = tqdm(
            total=total_steps, initial=first_step, desc="train", disable=not is_main, dynamic_ncols=True
        )

    def write(self, step: int, record: dict[str, float]) -> None:
        """One step's record: `loss/<term>` and other scalars (a name without "/" goes under `train/`)."""
        self.progress.update(1)
        if not self.is_main:
            return
        self.metrics_file.write(json.dumps({"step": step, **record}) + "\n")
        self.metrics_file.flush()
        postfix = {"loss": f"{record['loss/total']:.4f}"}
        if "samples_per_s" in record:
            postfix["samples_s"] = f"{record['samples_per_s']:.1f}"
        self.progress.set_postfix(**postfix)
        self.tracker.scalars(record, step)
        if step % self.log_every == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items())
            logger.info("step %d/%d (%s left) %s", step, self.total_steps, self.time_left(step), shown)

    def time_left(self, step: int) -> str:
        done = step - self.first_step
        seconds = (time.monotonic() - self.started) / done * (self.total_steps - step) if done else 0.0
        return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"

    def scalars(self, record: dict[str, float], step: int, file_name: str = "validation.jsonl") -> None:
        """Scalars outside the per-step record (the validation loss): to the tracker and their own JSONL file."""
        if self.is_main:
            self.tracker.scalars(record, step)
            with open(self.work_dir / file_name, "a") as file:
                file.write(json.dumps({"step": step, **record}) + "\n")

    def image(self, name: str, image: Image.Image, step: int) -> None:
        if self.is_main:
            self.tracker.image(name, image, step)

    def text(self, name: str, text: str, step: int) -> None:
        if self.is_main:
            self.tracker.text(name, text, step)

    def close(self) -> None:
        self.progress.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tracker is not None:
            self.tracker.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite `metrics.jsonl` without the records of steps after `step`, and without a line cut short by a kill
    (atomically; nothing to do if none)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        with atomic_path(path) as temporary:
            temporary.write_text("".join(kept))


def _step_of(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def run_header(config, world_size: int, accumulation: int, merged_config: Path) -> str:
    """What a run is, for `train.log` and the tracker's text tab: the code (git commit, and whether the tree had
    uncommitted changes), the library versions, the layout, and where the merged config is."""
    import platform

    import deepspeed
    import diffusers
    import torch
    import transformers

    repo = Path(__file__).resolve().parents[2]
    commit = _git(repo, "rev-parse", "HEAD") or "unknown (not a git checkout)"
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    versions = ", ".join(
        f"{name} {module.__version__}"
        for name, module in (("torch", torch), ("diffusers", diffusers), ("transformers", transformers),
                             ("deepspeed", deepspeed))
    )  # fmt: skip
    return "\n".join(
        [
            f"code: {commit}{' with uncommitted changes' if dirty else ''}",
            f"libraries: python {platform.python_version()}, {versions}",
            f"layout: world size {world_size}, micro-batch {config.batch.micro_batch_size} x {accumulation} "
            f"accumulation = global batch {config.batch.global_batch_size}; ZeRO-{config.deepspeed.zero_stage}, "
            f"{config.deepspeed.precision}",
            f"merged config: {merged_config}",
        ]
    )


def _git(repo: Path, *arguments: str) -> str:
    import subprocess

    try:
        result = subprocess.run(["git", "-C", str(repo), *arguments], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""
