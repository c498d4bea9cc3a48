"""Analytic FLOP counts of the dual-stream MMDiT, for throughput and model-FLOPs-utilisation logging.

A matrix multiply of (n x k) by (k x m) counts 2 n k m FLOPs (multiply and add). With D the hidden width,
T = N_img + N_txt the joint sequence, p the patch size and C the latent channels, one forward pass of one
sample costs

    num_layers x (24 D^2 T + 4 T^2 D)      blocks: each token's own stream's q, k, v and output projections
                                           (8 D^2) and feed-forward D -> 4D -> D (16 D^2); joint attention
                                           Q K^T and attention x V (2 T^2 D each)
  + 2 joint_attention_dim D N_txt          context embedder (T5 states -> D)
  + 2 p^2 C_in D (N_img + N_cond)          patch embedding of target and condition tokens
  + 2 D p^2 C_out N_img                    image head, when run (decodes the target tokens only)
  + 2 D vocab N_txt                        text head, when run

Left out as small next to these: norms, softmax, activations, the per-sample timestep MLP and adaLN
modulation (about 24 D^2 per block per sample, one token's worth), and the alignment heads (they read a
pooled, per-sample vector). Training costs 3 x forward (the backward pass is about twice the forward).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _field(config: Mapping[str, Any] | Any, name: str) -> int:
    """Read a config field from a mapping (a diffusers `model.config`, a JSON dict) or an attribute namespace."""
    return int(config[name] if isinstance(config, Mapping) else getattr(config, name))


def transformer_flops_terms(
    config: Mapping[str, Any] | Any,
    image_tokens: int,
    text_tokens: int,
    text_head: bool,
    image_head: bool,
    condition_tokens: int = 0,
) -> dict[str, int]:
    """The terms of `transformer_flops`, keyed by their formula (as in the module docstring), so that a report can
    print each term next to its value. A head that is not run has no term."""
    hidden = _field(config, "num_attention_heads") * _field(config, "attention_head_dim")
    layers = _field(config, "num_layers")
    patch_values = _field(config, "patch_size") ** 2
    stream_tokens = image_tokens + condition_tokens
    sequence = stream_tokens + text_tokens

    linear_per_token = 2 * (4 * hidden**2 + 2 * 4 * hidden**2)  # q, k, v, out; then D -> 4D -> D
    terms = {
        "num_layers x 24 D^2 T": layers * linear_per_token * sequence,
        "num_layers x 4 T^2 D": layers * 2 * 2 * sequence**2 * hidden,  # Q K^T and attention x V
        "2 joint_attention_dim D N_txt": 2 * _field(config, "joint_attention_dim") * hidden * text_tokens,
        "2 p^2 C_in D (N_img + N_cond)": 2 * patch_values * _field(config, "in_channels") * hidden * stream_tokens,
    }
    if image_head:
        terms["2 D p^2 C_out N_img"] = 2 * hidden * patch_values * _field(config, "out_channels") * image_tokens
    if text_head:
        terms["2 D vocab N_txt"] = 2 * hidden * _field(config, "vocab_size") * text_tokens
    return terms


def transformer_flops(
    config: Mapping[str, Any] | Any,
    image_tokens: int,
    text_tokens: int,
    text_head: bool,
    image_head: bool,
    condition_tokens: int = 0,
) -> int:
    """Forward FLOPs of one pass of one sample (formula in the module docstring).

    config needs num_layers, num_attention_heads, attention_head_dim, joint_attention_dim, patch_size,
    in_channels, out_channels and vocab_size. image_tokens are the target's tokens (the ones the image head
    decodes); condition_tokens are the condition images' tokens appended after them.
    """
    return sum(
        transformer_flops_terms(config, image_tokens, text_tokens, text_head, image_head, condition_tokens).values()
    )


def training_flops_per_sample(
    config: Mapping[str, Any] | Any, image_tokens: int, text_tokens: int, condition_tokens: int = 0
) -> int:
    """FLOPs of one training sample: forward + backward (3 x forward) of the image-stream pass (target and
    condition tokens, image head) and of the text-stream pass (clean target, no condition images, text head)."""
    image_pass = transformer_flops(
        config, image_tokens, text_tokens, text_head=False, image_head=True, condition_tokens=condition_tokens
    )
    text_pass = transformer_flops(config, image_tokens, text_tokens, text_head=True, image_head=False)
    return 3 * (image_pass + text_pass)


def recomputed_flops_per_sample(
    config: Mapping[str, Any] | Any,
    image_tokens: int,
    text_tokens: int,
    condition_tokens: int = 0,
    checkpoint_every: int = 0,
) -> int:
    """FLOPs that activation checkpointing adds to a training sample: backward runs the forward of every
    `checkpoint_every`-th block of both passes again (0: no checkpointing). Hardware FLOPs = model FLOPs + these."""
    if checkpoint_every <= 0:
        return 0
    layers = _field(config, "num_layers")
    recomputed_share = (layers // checkpoint_every) / layers

    def block_flops(**tokens) -> int:
        terms = transformer_flops_terms(config, text_tokens=text_tokens, text_head=False, image_head=False, **tokens)
        return terms["num_layers x 24 D^2 T"] + terms["num_layers x 4 T^2 D"]

    image_pass = block_flops(image_tokens=image_tokens, condition_tokens=condition_tokens)
    text_pass = block_flops(image_tokens=image_tokens)
    return round(recomputed_share * (image_pass + text_pass))
