"""Where a run's numbers go, on rank 0 only: `metrics.jsonl` (one record per step), TensorBoard scalars, the tqdm
bar and, every `logging.every_steps`, a line in `train.log`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("unialignment.train")


class MetricsLog:
    """Open on every rank; only the main rank writes. Use as a context manager so the files are closed."""

    def __init__(self, work_dir: Path, is_main: bool, total_steps: int, first_step: int, log_every: int):
        self.is_main, self.log_every = is_main, log_every
        self.writer = self.metrics_file = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter  # imported where used: tensorboard is slow to import

            self.writer = SummaryWriter(work_dir / "tensorboard")
            self.metrics_file = open(work_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
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
        for name, value in record.items():
            self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
        if step % self.log_every == 0:
            logger.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in record.items()))

    def close(self) -> None:
        self.progress.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
