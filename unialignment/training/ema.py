"""Exponential moving average of the trainable weights, sharded across data-parallel ranks.

A full fp32 copy of a 2.1 B-parameter model per rank would cost 8.5 GB on every GPU. Instead each rank keeps the
average of the weights it owns: under ZeRO-3 its partition of every parameter (`param.ds_tensor`), under ZeRO
0-2 every `world_size`-th parameter. `gather` assembles the full averaged weights on rank 0, which a checkpoint
stores once; `load_full` takes a rank's shard back out of them, for any world size.
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

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """This rank's shard as checkpoints before `load_full` stored it (per rank, for the same world size)."""
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
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Take this rank's shard out of the full averaged weights (`gather`'s result, as a checkpoint stores it),
        whatever the world size that wrote them: under ZeRO-3 this rank's partition of each flattened parameter,
        otherwise the whole tensors of the parameters this rank owns."""
        missing = sorted(set(self.parameters) - set(full))
        if missing:
            raise ValueError(f"the stored EMA lacks {len(missing)} parameters of this model, e.g. {missing[0]}")
        for name, shadow in self.shadow.items():
            param, tensor = self.parameters[name], full[name].float()
            if _is_zero3_param(param):
                flat = tensor.flatten().to(shadow.device)
                size = shadow.numel()
                padded = torch.nn.functional.pad(flat, (0, size * self.world_size - flat.numel()))
                shadow.copy_(padded[self.rank * size : (self.rank + 1) * size])
            else:
                shadow.copy_(tensor.view_as(shadow))

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
