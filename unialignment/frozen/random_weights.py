"""Modules with random weights drawn straight on the device, for benchmarks and memory estimates at full size.

No checkpoint can be read where weights cannot be downloaded; speed and memory do not depend on the weights'
values, so the frozen components (and, in tests, the transformer) are built from their configs this way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedModel

# Scale of the random weights: matrices N(0, 0.02^2) as transformers initialises them, norm scales 1, biases 0.
WEIGHT_STD = 0.02


def build_with_random_weights(
    build: Callable[[], nn.Module], device: str | torch.device, dtype: torch.dtype, seed: int = 0, cast_buffers=False
) -> nn.Module:
    """`build()` with its parameters on the meta device, then each parameter drawn on `device` in `dtype`: a 4.7 B
    T5 and a 1.2 B teacher cost no CPU initialisation and no float32 copy. Buffers (rotary frequencies, a position
    table) are computed at construction as usual and moved, and with `cast_buffers` cast to `dtype`, as diffusers'
    `from_pretrained(torch_dtype=...)` does (transformers keeps them in float32). Tied parameters stay tied."""
    device = torch.device(device)
    with init_empty_weights(include_buffers=False):
        module = build()
    if isinstance(module, PreTrainedModel):
        module.tie_weights()  # accelerate's meta initialisation unties them (T5's shared embedding); free on meta
    generator = torch.Generator(device).manual_seed(seed)
    drawn: dict[int, nn.Parameter] = {}
    for submodule in module.modules():
        for name, param in list(submodule.named_parameters(recurse=False)):
            if id(param) not in drawn:
                value = torch.empty(param.shape, device=device, dtype=dtype)
                if param.ndim >= 2:
                    value.normal_(0.0, WEIGHT_STD, generator=generator)
                else:  # biases 0, norm scales 1
                    value.fill_(0.0 if name.endswith("bias") else 1.0)
                drawn[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            setattr(submodule, name, drawn[id(param)])
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            cast = cast_buffers and buffer.is_floating_point()
            setattr(submodule, name, buffer.to(device, dtype if cast else buffer.dtype))
    return module
