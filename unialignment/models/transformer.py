"""The UniAlignment dual-stream MMDiT.

Stable Diffusion 3's multimodal diffusion transformer (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis") turned into a network whose two token streams are
both outputs, as in Dual Diffusion (Li et al. 2024, D-DiT) and UniAlignment (Song et al. 2025,
arXiv:2509.23760): image tokens (VAE latents, trained with rectified flow) and text tokens (T5
encodings, trained with masked discrete diffusion) meet in joint attention in every block.

Changes to SD3 (docs/METHOD.md section 1):
1. the last block keeps its text branch, so text tokens come out of the network;
2. the conditioning vector is the timestep embedding only (no pooled-CLIP projection);
3. the image head is SD3's (AdaLayerNormContinuous + linear + unpatchify), predicting velocity;
4. a text head (LayerNorm without affine + linear) predicts logits over the T5 vocabulary;
5. a learned null image stands in for the image stream of text-only samples;
6. condition images (editing, perception, composition) are patch-embedded like the target and
   appended after it; only the target is decoded;
7. two alignment heads read the states after block `align_depth`.

Beyond the reference (off by default, so the released checkpoint computes what it always did):
`text_position_embedding` adds a fixed 1D sin-cos position table to the text tokens. Without it the text
stream has no absolute positions: T5 is relative-position only, and at an all-mask input every position
encodes to the same state, so the network predicts the same distribution at every position and the first
tokens a caption sampler unmasks land at arbitrary places (captions come out rotated or scrambled).
`interpolation_scale` (diffusers' `PatchEmbed` argument; SD3 uses 1) divides the positions of the image tokens'
sin-cos table: below 1 it spreads them apart. On a small token grid SD3's table puts neighbouring positions almost
on top of each other (cosine 0.996 between neighbours of an 8 x 8 grid at width 128), so attention can hardly tell
a token's own place from the next, which an edit needs to copy its source image place by place. The table is
stored with the weights, so a checkpoint keeps the table it was trained with.

The network knows nothing about noise: losses and samplers live in `unialignment.diffusion` and
`unialignment.alignment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, JointTransformerBlock
from diffusers.models.embeddings import (
    PatchEmbed,
    TimestepEmbedding,
    Timesteps,
    get_1d_sincos_pos_embed_from_grid,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.utils import BaseOutput
from torch import nn

from unialignment.models.attention import PaddedJointAttnProcessor


@dataclass
class UniAlignmentTransformerOutput(BaseOutput):
    """What one pass returns; a field the caller did not ask for is None.

    velocity: (B, C, H, W) rectified-flow velocity of the target latent only.
    text_logits: (B, L, vocab) logits over the T5 vocabulary, float32 upcast left to the loss.
    image_hidden_states: (B, N_target, D) final image states of the target after the image head's norm.
    text_hidden_states: (B, L, D) final text states after the text head's norm.
    image_alignment: (B, D_teacher) block-`align_depth` target image states, pooled, through the image
        alignment head.
    text_alignment: (B, D_teacher) block-`align_depth` text states, pooled, through the text alignment head.
    """

    velocity: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    image_hidden_states: torch.Tensor | None = None
    text_hidden_states: torch.Tensor | None = None
    image_alignment: torch.Tensor | None = None
    text_alignment: torch.Tensor | None = None


class TimestepConditioning(nn.Module):
    """Sinusoidal(256, flip_sin_to_cos, shift 0) -> MLP: SD3's timestep embedder without the pooled-text
    projection. Kept under SD3's attribute names so its weights load from SD3 and the released model."""

    def __init__(self, embedding_dim: int, num_channels: int = 256):
        super().__init__()
        self.time_proj = Timesteps(num_channels=num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=num_channels, time_embed_dim=embedding_dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        """timestep: (B,) in [0, 1000] -> (B, D)."""
        timestep_features = self.time_proj(timestep)
        return self.timestep_embedder(timestep_features.to(self.timestep_embedder.linear_1.weight.dtype))


class AlignmentHead(nn.Module):
    """Mean over tokens -> Linear -> SiLU -> Linear -> SiLU, projecting transformer states into the teacher's
    feature space (REPA-style representation alignment, Yu et al. 2024)."""

    def __init__(self, hidden_size: int, alignment_hidden_dim: int, teacher_dim: int):
        super().__init__()
        # `fc` is the authors' attribute name; indices 0 and 2 are the linears of the released checkpoint.
        self.fc = nn.Sequential(
            nn.Linear(hidden_size, alignment_hidden_dim),
            nn.SiLU(),
            nn.Linear(alignment_hidden_dim, teacher_dim),
            nn.SiLU(),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, N, D) -> (B, teacher_dim)."""
        return self.fc(hidden_states.mean(dim=1))


class UniAlignmentTransformer(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    """SD3 MMDiT with an image head and a text head; see the module docstring for the seven changes.

    The defaults are SD3-medium's (24 blocks, 24 heads x 64 = 1536). Attribute names follow the authors'
    released `transformer/` folder (`_class_name: SD3JointModelFlexible`), so it loads strictly and our
    exports load in their code. `pooled_projection_dim` is unused (there is no pooled projection any
    more) and kept only so that SD3's and the authors' configs round-trip unchanged. The authors
    hard-coded the teacher width, the alignment hidden width, the null-image length and the alignment
    depth; here they are config fields with the authors' values as defaults.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 192,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        vocab_size: int = 32100,
        teacher_dim: int = 3584,
        alignment_hidden_dim: int = 2048,
        num_null_image_tokens: int = 8,
        align_depth: int = 8,
        text_position_embedding: bool = False,
        interpolation_scale: float = 1.0,
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        if caption_projection_dim != inner_dim:
            raise ValueError(
                f"caption_projection_dim ({caption_projection_dim}) must equal num_attention_heads x "
                f"attention_head_dim ({inner_dim}): text and image tokens share joint attention."
            )
        if not 1 <= align_depth <= num_layers:
            raise ValueError(f"align_depth must be in 1..num_layers={num_layers} (counted from 1), got {align_depth}.")
        self.inner_dim = inner_dim
        self.out_channels = out_channels if out_channels is not None else in_channels

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=inner_dim,
            pos_embed_max_size=pos_embed_max_size,
            interpolation_scale=interpolation_scale,
        )
        # Authors' name: in SD3 this module also held the pooled-text projection, now removed (change 2).
        self.time_text_embed = TimestepConditioning(inner_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        # Learned stand-in image stream for samples without an image (change 5), N(0, 1) / sqrt(D).
        self.null_image_embd = nn.Parameter(torch.randn(1, num_null_image_tokens, inner_dim) / inner_dim**0.5)

        # Every block keeps its text branch, the last one included (change 1).
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim=inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=False,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual_attention_layers,
                )
                for i in range(num_layers)
            ]
        )
        # Image head (change 3): SD3's norm_out / proj_out under the authors' names.
        self.image_norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=1e-6)
        self.image_proj_out = nn.Linear(inner_dim, patch_size * patch_size * self.out_channels)
        # Text head (change 4): the norm has no parameters, so only `text_proj_out` is in the checkpoint.
        self.text_norm_out = nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)
        self.text_proj_out = nn.Linear(inner_dim, vocab_size)

        # Alignment heads (change 7). "siglip_adapter" is the authors' name, kept for checkpoint
        # compatibility; the teacher is Qwen2.5-VL, not SigLIP.
        self.siglip_adapter_img = AlignmentHead(inner_dim, alignment_hidden_dim, teacher_dim)
        self.siglip_adapter_text = AlignmentHead(inner_dim, alignment_hidden_dim, teacher_dim)

        self.gradient_checkpointing = False
        # With gradient checkpointing on: recompute every `checkpoint_every`-th block in backward (1: every block),
        # keeping the other blocks' activations. Not a config field: it changes no weight, only memory and time.
        self.checkpoint_every = 1

    def _embed_image(self, latents: torch.Tensor, name: str) -> torch.Tensor:
        """(B, C, H, W) latents -> (B, H*W/p^2, D) tokens with SD3's cropped positional embedding."""
        patch_size, channels = self.config.patch_size, self.config.in_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(latents.shape)}.")
        if latents.shape[-2] % patch_size or latents.shape[-1] % patch_size:
            raise ValueError(
                f"{name} height and width must be divisible by patch_size={patch_size}, got {tuple(latents.shape)}."
            )
        # PatchEmbed's output is a transposed view; make it contiguous for the attention kernels.
        return self.pos_embed(latents).contiguous()

    def _text_positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        """(1, length, D) fixed sin-cos table of the text positions 0..length-1 (no weights: nothing to load)."""
        positions = torch.arange(length, device=like.device)
        table = get_1d_sincos_pos_embed_from_grid(self.inner_dim, positions, output_type="pt")
        return table.to(like.dtype).unsqueeze(0)

    def _unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, H*W/p^2, p*p*C) -> (B, C, H, W)."""
        p, channels = self.config.patch_size, self.out_channels
        tokens = tokens.reshape(tokens.shape[0], height // p, width // p, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", tokens).reshape(tokens.shape[0], channels, height, width)

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        condition_latents: list[torch.Tensor] | None = None,
        *,
        return_velocity: bool = True,
        return_text_logits: bool = False,
        return_hidden_states: bool = False,
        return_alignment: bool = False,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> UniAlignmentTransformerOutput | tuple:
        """One pass through both streams.

        Image-stream pass: noisy target latents, the condition latents of edits and compositions, the
        flow-matching timestep, the prompt's T5 states. Text-stream pass: clean image latents (or None
        for the null image), timestep 0, the T5 states of the noisy text.

        Args:
            hidden_states: (B, C, H, W) target latents, or None to use the null image for the whole batch.
            encoder_hidden_states: (B, L, joint_attention_dim) T5 encoder states.
            timestep: (B,) or scalar, in the scheduler's [0, 1000] range.
            condition_latents: k tensors (B, C, H_i, W_i) of clean condition latents, appended after the
                target in the image stream.
            return_velocity / return_text_logits: run the image head / the text head.
            return_hidden_states: return the final states of both streams after their heads' norms.
            return_alignment: return both alignment heads' outputs at block `align_depth`.
        """
        batch_size = encoder_hidden_states.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.config.joint_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must have shape (B, L, {self.config.joint_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}."
            )
        if return_velocity and hidden_states is None:
            raise ValueError("return_velocity needs target latents; a text-only pass sets return_velocity=False.")

        timestep = torch.as_tensor(timestep, device=encoder_hidden_states.device)
        temb = self.time_text_embed(timestep.expand(batch_size))
        image_tokens = self._image_tokens(hidden_states, condition_latents, batch_size, encoder_hidden_states.dtype)
        num_target_tokens = image_tokens.shape[1] - sum(
            self._num_tokens(latents) for latents in condition_latents or []
        )
        text_tokens = self.context_embedder(encoder_hidden_states)
        if self.config.text_position_embedding:
            text_tokens = text_tokens + self._text_positions(text_tokens.shape[1], text_tokens)

        # BaseOutput only exposes the fields set at construction, so collect them first.
        outputs: dict[str, torch.Tensor] = {}
        for depth, block in enumerate(self.transformer_blocks, start=1):
            if torch.is_grad_enabled() and self.gradient_checkpointing and depth % self.checkpoint_every == 0:
                text_tokens, image_tokens = self._gradient_checkpointing_func(
                    block, image_tokens, text_tokens, temb, joint_attention_kwargs
                )
            else:
                text_tokens, image_tokens = block(
                    hidden_states=image_tokens,
                    encoder_hidden_states=text_tokens,
                    temb=temb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )
            if return_alignment and depth == self.config.align_depth:
                # Only the target's tokens are pooled: condition images are inputs, not what is generated.
                outputs["image_alignment"] = self.siglip_adapter_img(image_tokens[:, :num_target_tokens])
                outputs["text_alignment"] = self.siglip_adapter_text(text_tokens)

        target_size = None if hidden_states is None else hidden_states.shape[-2:]
        flags = dict(velocity=return_velocity, text_logits=return_text_logits, hidden_states=return_hidden_states)
        outputs.update(self._heads(image_tokens[:, :num_target_tokens], text_tokens, temb, target_size, **flags))
        output = UniAlignmentTransformerOutput(**outputs)
        return output if return_dict else output.to_tuple()

    def _num_tokens(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1] // self.config.patch_size**2

    def _image_tokens(
        self,
        hidden_states: torch.Tensor | None,
        condition_latents: list[torch.Tensor] | None,
        batch_size: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The image stream: the target's tokens (or the null image's), then every condition image's."""
        if hidden_states is None:
            image_tokens = self.null_image_embd.expand(batch_size, -1, -1).to(dtype)
        else:
            if hidden_states.shape[0] != batch_size:
                raise ValueError(f"hidden_states has batch {hidden_states.shape[0]}, text states {batch_size}.")
            image_tokens = self._embed_image(hidden_states, "hidden_states")
        if not condition_latents:
            return image_tokens
        condition_tokens = [
            self._embed_image(latents, f"condition_latents[{i}]") for i, latents in enumerate(condition_latents)
        ]
        return torch.cat([image_tokens, *condition_tokens], dim=1)

    def _heads(
        self,
        target_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        temb: torch.Tensor,
        target_size: tuple[int, int] | None,
        velocity: bool,
        text_logits: bool,
        hidden_states: bool,
    ) -> dict[str, torch.Tensor]:
        """The asked-for outputs of the last states: velocity (image head), text logits (text head), and the
        states after each head's norm."""
        outputs = {}
        if velocity or hidden_states:
            target_states = self.image_norm_out(target_tokens, temb)
            if hidden_states:
                outputs["image_hidden_states"] = target_states
            if velocity:
                outputs["velocity"] = self._unpatchify(self.image_proj_out(target_states), *target_size)
        if text_logits or hidden_states:
            text_states = self.text_norm_out(text_tokens)
            if hidden_states:
                outputs["text_hidden_states"] = text_states
            if text_logits:
                outputs["text_logits"] = self.text_proj_out(text_states)
        return outputs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading, made strict: every tensor of the checkpoint used, none missing, no shape
        mismatch; anything else is an error that names the tensors."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = {kind: loading_info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            details = "; ".join(f"{kind}: {sorted(map(str, keys))}" for kind, keys in problems.items() if keys)
            raise ValueError(f"{pretrained_model_name_or_path} does not match {cls.__name__} strictly: {details}")
        return (model, loading_info) if output_loading_info else model

    def pad_narrow_heads(self) -> None:
        """Run joint attention through `PaddedJointAttnProcessor`: heads narrower than 16 channels are zero-padded
        to 16 for PyTorch's CPU attention kernel. The same outputs and gradients; faster on some CPUs, slower on
        others (`scripts/benchmark_attention.py` says which on yours). Other heads and GPU tensors are unchanged."""
        self.set_attn_processor(PaddedJointAttnProcessor())

    def compile_blocks(self, **compile_kwargs) -> None:
        """Compile each joint block on its own with `torch.compile` (regional compilation): one compiled graph,
        reused by every block, compiles in a fraction of the whole model's time, and a new resolution recompiles a
        block rather than the model. Works with gradient checkpointing (the checkpoint calls the compiled block).
        `compile_kwargs` go to `torch.compile` (`mode="reduce-overhead"`: CUDA graphs)."""
        for block in self.transformer_blocks:
            block.compile(**compile_kwargs)
