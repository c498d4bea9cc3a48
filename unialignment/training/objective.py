"""One UniAlignment training micro-step as a loss: both streams and both alignments (docs/METHOD.md section 5).

Dual-stream training as in UniAlignment (Song et al. 2025, arXiv:2509.23760), built on D-DiT's dual
diffusion (Li et al. 2024): the image-stream pass denoises the target latent under rectified flow given
the (sometimes dropped) condition text; the text-stream pass denoises the masked caption under MDLM
given the clean image at timestep 0. The cross-modal contrastive loss pairs the two passes' final
states; the intrinsic-modal loss pulls the block-`align_depth` states toward a frozen teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from unialignment.alignment.contrastive import contrastive_loss, pool_tokens
from unialignment.alignment.representation import cosine_alignment_loss
from unialignment.data.features import TrainingBatch
from unialignment.diffusion.flow_matching import add_noise, drop_condition, flow_matching_loss, sample_timesteps
from unialignment.diffusion.masked_diffusion import (
    LogLinearSchedule,
    mask_tokens,
    masked_diffusion_loss,
    sample_antithetic_times,
    subs_log_probs,
)
from unialignment.models.transformer import UniAlignmentTransformer, UniAlignmentTransformerOutput


@dataclass
class LossWeights:
    """L = image + text * L_text + contrastive * L_con + align_image * L_align_img + align_text * L_align_txt."""

    image: float = 1.0
    text: float = 0.2
    contrastive: float = 0.05
    align_image: float = 0.1
    align_text: float = 0.1


@dataclass
class ObjectiveConfig:
    """Every constant of the micro-step; the defaults are the reference settings (docs/METHOD.md sections 3-5)."""

    weights: LossWeights = field(default_factory=LossWeights)
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    condition_dropout: float = 0.1
    text_schedule_eps: float = 1e-3
    text_sampling_eps: float = 1e-3
    text_loss_normalization: str = "batch_length"
    contrastive_temperature: float = 0.07
    gather_contrastive_negatives: bool = False

    def __post_init__(self):
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)


@dataclass
class UniAlignmentLosses:
    """Every term as a scalar tensor; a skipped term is a zero that carries no gradient."""

    total: torch.Tensor
    image: torch.Tensor
    text: torch.Tensor
    contrastive: torch.Tensor
    align_image: torch.Tensor
    align_text: torch.Tensor

    def scalars(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name).detach().item() for f in fields(self)}


class UniAlignmentObjective:
    """Computes `UniAlignmentLosses` for a model and a batch; holds no trainable state.

    Args:
        scheduler: the training `FlowMatchEulerDiscreteScheduler` (shift 1.0 in the reference).
        mask_token_id: T5's `<extra_id_0>` id, looked up from the tokenizer.
        encode_text_ids: frozen T5, (B, L) ids -> (B, L, D_t5) states, called without gradient.
        null_prompt_embeds: (1, L, D_t5) T5 states of " ", used for condition dropout.
    """

    def __init__(
        self,
        config: ObjectiveConfig,
        scheduler: FlowMatchEulerDiscreteScheduler,
        mask_token_id: int,
        encode_text_ids: Callable[[torch.Tensor], torch.Tensor],
        null_prompt_embeds: torch.Tensor,
    ):
        self.config = config
        self.scheduler = scheduler
        self.mask_token_id = mask_token_id
        self.encode_text_ids = encode_text_ids
        self.null_prompt_embeds = null_prompt_embeds
        self.text_schedule = LogLinearSchedule(eps=config.text_schedule_eps)

    def __call__(
        self, model: UniAlignmentTransformer, batch: TrainingBatch, generator: torch.Generator | None = None
    ) -> UniAlignmentLosses:
        """`generator` is a CPU generator: every random draw (timesteps, noise, dropout, masks) is made on
        the CPU and moved, so a run is reproducible across devices and resumable from the generator state."""
        weights = self.config.weights
        want_contrastive = weights.contrastive > 0
        want_align = (weights.align_image > 0 and batch.teacher_image_targets is not None) or (
            weights.align_text > 0 and batch.teacher_text_targets is not None
        )
        # 1. and 2.: the two passes, in this order (their random draws share the generator).
        image_loss, image_pass = self.image_stream(model, batch, generator, want_contrastive, want_align)
        text_loss, text_pass = self.text_stream(model, batch, generator, want_contrastive, want_align)

        # 3. Cross-modal alignment: final image states of pass 1 against final text states of pass 2.
        zero = torch.zeros((), device=batch.target_latents.device)
        contrastive = zero
        if want_contrastive:
            contrastive = contrastive_loss(
                pool_tokens(image_pass.image_hidden_states),
                pool_tokens(text_pass.text_hidden_states),
                self.config.contrastive_temperature,
                self.config.gather_contrastive_negatives,
            )

        # 4. Intrinsic-modal alignment toward the frozen teacher.
        align_image = align_text = zero
        if want_align and batch.teacher_image_targets is not None:
            align_image = cosine_alignment_loss(image_pass.image_alignment, batch.teacher_image_targets)
        if want_align and batch.teacher_text_targets is not None:
            align_text = cosine_alignment_loss(text_pass.text_alignment, batch.teacher_text_targets)

        total = (
            weights.image * image_loss
            + weights.text * text_loss
            + weights.contrastive * contrastive
            + weights.align_image * align_image
            + weights.align_text * align_text
        )
        return UniAlignmentLosses(total, image_loss, text_loss, contrastive, align_image, align_text)

    def image_stream(
        self,
        model: UniAlignmentTransformer,
        batch: TrainingBatch,
        generator: torch.Generator | None,
        return_hidden_states: bool,
        return_alignment: bool,
    ) -> tuple[torch.Tensor, UniAlignmentTransformerOutput]:
        """Rectified flow on the target, condition images clean: (the loss, the pass's outputs)."""
        config = self.config
        device, batch_size = batch.target_latents.device, batch.target_latents.shape[0]
        timesteps, sigmas = sample_timesteps(
            self.scheduler,
            batch_size,
            config.weighting_scheme,
            config.logit_mean,
            config.logit_std,
            config.mode_scale,
            generator=generator,
            device=device,
        )
        noise = randn_tensor(batch.target_latents.shape, generator=generator, dtype=torch.float32).to(
            device, batch.target_latents.dtype
        )
        noisy_latents = add_noise(batch.target_latents, noise, sigmas)
        prompt_embeds, _ = drop_condition(
            batch.prompt_embeds, self.null_prompt_embeds.to(device), config.condition_dropout, generator
        )
        image_pass = model(
            noisy_latents,
            prompt_embeds,
            timesteps,
            batch.condition_latents,
            return_hidden_states=return_hidden_states,
            return_alignment=return_alignment,
        )
        image_loss = flow_matching_loss(
            image_pass.velocity, noisy_latents, batch.target_latents, sigmas, config.weighting_scheme
        )
        return image_loss, image_pass

    def text_stream(
        self,
        model: UniAlignmentTransformer,
        batch: TrainingBatch,
        generator: torch.Generator | None,
        return_hidden_states: bool,
        return_alignment: bool,
    ) -> tuple[torch.Tensor, UniAlignmentTransformerOutput]:
        """MDLM on the caption, the clean image (or the null image) at timestep 0: (the loss, the pass's outputs)."""
        config = self.config
        device, batch_size = batch.target_latents.device, batch.target_latents.shape[0]
        text_times = sample_antithetic_times(batch_size, config.text_sampling_eps, generator=generator)
        caption_ids = batch.caption_ids.cpu()
        score_mask = None if batch.caption_score_mask is None else batch.caption_score_mask.cpu()
        noisy_ids = mask_tokens(
            caption_ids, self.text_schedule.mask_probability(text_times), self.mask_token_id, score_mask, generator
        ).to(device)
        with torch.no_grad():
            noisy_text_embeds = self.encode_text_ids(noisy_ids)
        if batch.text_stream_uses_null_image:
            text_stream_latents = None
        else:
            text_stream_latents = (
                batch.target_latents if batch.text_stream_latents is None else batch.text_stream_latents
            )
        text_pass = model(
            text_stream_latents,
            noisy_text_embeds.to(batch.prompt_embeds.dtype),
            torch.zeros(batch_size, device=device),
            return_velocity=False,
            return_text_logits=True,
            return_hidden_states=return_hidden_states,
            return_alignment=return_alignment,
        )
        text_times = text_times.to(device)
        text_loss = masked_diffusion_loss(
            subs_log_probs(text_pass.text_logits, noisy_ids, self.mask_token_id),
            batch.caption_ids,
            self.text_schedule.sigma(text_times),
            self.text_schedule.dsigma(text_times),
            score_mask=batch.caption_score_mask,
            attention_mask=batch.caption_attention_mask,
            normalization=config.text_loss_normalization,
        ).loss
        return text_loss, text_pass
