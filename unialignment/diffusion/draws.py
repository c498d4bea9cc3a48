"""The random numbers of one training micro-step, held together so that they can be drawn ahead.

A micro-step of UniAlignment's dual diffusion (docs/METHOD.md section 5) draws, in this order: the image stream's
flow-matching timesteps and noise (section 3), the condition-dropout decisions, the text stream's stratified times
and its mask draws (section 4). All of them come from one CPU generator, so a run is the same on any device and
resumes from the generator's state. Drawn before the step's device work starts and sent over together, they cost the
device nothing and need no synchronisation; drawn inline, a device-side batch would have to come back to the host
for its caption ids. `MicroStepDraws` is what the objective consumes either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class MicroStepDraws:
    """timesteps, sigmas: (B,) flow-matching timesteps and their sigmas. noise: (B, C, H, W) float32 noise of the
    target latent. dropped: (B,) bool, the samples whose condition text is replaced by the null prompt.
    text_times: (B,) float32 masked-diffusion times. noisy_ids: (B, L) long, the caption after masking.
    masked_index: (N,) long, the flat positions (row * L + column) of the masked tokens that the text loss scores;
    with it the memory-light text loss knows its shapes without asking the device."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    noise: torch.Tensor
    dropped: torch.Tensor
    text_times: torch.Tensor
    noisy_ids: torch.Tensor
    masked_index: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroStepDraws:
        """Every tensor on `device`; with `non_blocking` from pinned memory the copies overlap the host's work."""
        return MicroStepDraws(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in dataclasses.fields(self)}
        )

    def pin_memory(self) -> MicroStepDraws:
        return MicroStepDraws(**{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)})
