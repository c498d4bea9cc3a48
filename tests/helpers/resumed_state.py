"""Run by tests/test_training.py under torchrun: build the trainer for a config, which resumes from its run folder,
and write what the ranks hold after loading: the engine saved again as it stands and converted to DeepSpeed's universal
format (one file per parameter and state: fp32 weight, AdamW moments), whatever the number of ranks, and the EMA
gathered whole, the step, the learning rate and the sampler's state.

    python -m torch.distributed.run --nproc_per_node N tests/helpers/resumed_state.py CONFIG OUT_DIR [--key value ...]
"""

import sys
from pathlib import Path

import torch

from unialignment.training.checkpoint import convert_to_universal
from unialignment.training.config import load_config, parse_overrides
from unialignment.training.trainer import Trainer


def main() -> None:
    config_path, out = sys.argv[1], Path(sys.argv[2])
    trainer = Trainer(load_config(config_path, parse_overrides(sys.argv[3:])))
    engine = trainer.rig.engine
    engine.save_checkpoint(str(out), tag="resumed", save_latest=False)
    ema = trainer.rig.ema.gather()
    trainer.ctx.barrier()
    if trainer.ctx.is_main:
        convert_to_universal(out / "resumed")
        state = {"ema": ema, "step": trainer.step, "lr": engine.get_lr(), "sampler": trainer.sampler.state_dict()}
        torch.save(state, out / "state.pt")
    trainer.ctx.barrier()


if __name__ == "__main__":
    main()
