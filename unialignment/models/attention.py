"""Joint attention (SD3's MMDiT, Esser et al. 2024) with narrow heads zero-padded for the CPU kernel.

Zero-padding queries, keys and values from fewer than 16 channels to 16 leaves every logit and every output channel
what it was (the padded channels add 0 to each dot product and come out 0). Whether PyTorch's CPU attention kernel
then runs faster depends on the CPU: 16 sequences of 212 tokens at width 128 as 16 heads of 8, forward and backward
on 2 cores, took 46-53 ms as is and 32-38 ms padded on one machine (1.2-1.8x faster), 22 ms as is and 34 ms padded
on another (AVX-512; 8 heads of 16 took 14-17 and 11 ms). So it is a switch, off by default:
`UniAlignmentTransformer.pad_narrow_heads()`, `speed.pad_narrow_heads` in training; `scripts/benchmark_attention.py`
says which is faster on a given machine. GPU tensors and heads of 16 or more channels are never padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

# Heads narrower than this are padded up to it on CPU.
CPU_MIN_HEAD_DIM = 16


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Scaled-dot-product attention over (B, heads, L, head_dim), padding narrow heads on CPU."""
    head_dim = query.shape[-1]
    if query.device.type != "cpu" or head_dim >= CPU_MIN_HEAD_DIM:
        return F.scaled_dot_product_attention(query, key, value)
    pad = (0, CPU_MIN_HEAD_DIM - head_dim)
    padded = F.scaled_dot_product_attention(F.pad(query, pad), F.pad(key, pad), F.pad(value, pad), scale=head_dim**-0.5)
    return padded[..., :head_dim]


class PaddedJointAttnProcessor:
    """The computation of diffusers' `JointAttnProcessor2_0`, with `attend` in place of its attention call.

    Image tokens come first in the joint sequence, text tokens after them, as in SD3. Without text states (the
    second attention of SD3.5's dual-attention blocks) it attends over the image tokens alone.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("joint attention takes no attention mask: every image and text token attends to all.")
        num_image_tokens = hidden_states.shape[1]
        query = self._heads(attn, attn.to_q(hidden_states), attn.norm_q)
        key = self._heads(attn, attn.to_k(hidden_states), attn.norm_k)
        value = self._heads(attn, attn.to_v(hidden_states), None)
        if encoder_hidden_states is not None:
            query = torch.cat([query, self._heads(attn, attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], 2)
            key = torch.cat([key, self._heads(attn, attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], 2)
            value = torch.cat([value, self._heads(attn, attn.add_v_proj(encoder_hidden_states), None)], 2)

        out = attend(query, key, value)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :num_image_tokens]))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, num_image_tokens:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out

    @staticmethod
    def _heads(attn: Attention, projected: torch.Tensor, norm: torch.nn.Module | None) -> torch.Tensor:
        """(B, L, heads * head_dim) -> (B, heads, L, head_dim), then the per-head norm where the block has one."""
        batch_size, length, width = projected.shape
        heads = projected.view(batch_size, length, attn.heads, width // attn.heads).transpose(1, 2)
        return heads if norm is None else norm(heads)
