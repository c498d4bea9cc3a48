"""Exponential moving average of the trainable weights, sharded across data-parallel ranks.

A full fp32 copy of a 2.1 B-parameter model per rank would cost 8.5 GB on every GPU. Instead each rank keeps the
average of the weights it owns: under ZeRO-3 its partition of every parameter (`param.ds_tensor`), under ZeRO
0-2 every `world_size`-th parameter. Each rank saves its own shard with the checkpoint; `gather` assembles the
full averaged weights on rank 0 for export.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor")


class ShardedEMA:
    """shadow <- decay * shadow + (1 - decay) * weight, after every applied optimizer step, in float32."""

    def __init__(self, model: nn.Module, decay: float, rank: int = 0, world_size: int = 1):
        self.decay, self.rank, self.world_size = decay, rank, world_size
        self.parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}
        for position, (name, param) in enumerate(self.parameters.items()):
            if _is_zero3_param(param):
                self.shadow[name] = param.ds_tensor.detach().float().clone()
            elif position % world_size == rank:
                self.shadow[name] = param.detach().float().clone()

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor if _is_zero3_param(param) else param

    @torch.no_grad()
    def update(self) -> None:
        for name, shadow in self.shadow.items():
            shadow.lerp_(self._local(self.parameters[name]).float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's shard, keyed by parameter name."""
        return {name: tensor.cpu() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(
                "the EMA shard does not match this rank's parameters (was the run resumed with another world size "
                "or ZeRO stage?); missing: " + ", ".join(sorted(set(self.shadow) - set(state))[:5])
            )
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA shard tensor {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(tensor)

    @torch.no_grad()
    def gather(self) -> dict[str, torch.Tensor] | None:
        """The full averaged weights on rank 0 (None elsewhere); every rank must call this."""
        distributed = dist.is_initialized() and self.world_size > 1
        full = {}
        for position, (name, param) in enumerate(self.parameters.items()):
            if _is_zero3_param(param):
                shard = self.shadow[name]
                if distributed:
                    pieces = [torch.empty_like(shard) for _ in range(self.world_size)]
                    dist.all_gather(pieces, shard)
                    shard = torch.cat(pieces)
                tensor = shard[: param.ds_numel].view(param.ds_shape)
            else:
                owner = position % self.world_size
                tensor = (
                    self.shadow[name]
                    if owner == self.rank
                    else torch.empty(param.shape, dtype=torch.float32, device=param.device)
                )
                if distributed:
                    dist.broadcast(tensor, src=owner)
            if self.rank == 0:
                full[name] = tensor.cpu().clone()
        return full if self.rank == 0 else None
