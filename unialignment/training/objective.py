"""One UniAlignment training micro-step as a loss: both streams and both alignments (docs/METHOD.md section 5).

Dual-stream training as in UniAlignment (Song et al. 2025, arXiv:2509.23760), built on D-DiT's dual
diffusion (Li et al. 2024): the image-stream pass denoises the target latent under rectified flow given
the (sometimes dropped) condition text; the text-stream pass denoises the masked caption under MDLM
given the clean image at timestep 0. The cross-modal contrastive loss pairs the two passes' final
states; the intrinsic-modal loss pulls the block-`align_depth` states toward a frozen teacher.

Two ways of computing the same losses, each switched by `speed` in the training config and tested equal to the
plain path: `fuse_t2i_passes` runs both passes of a text-to-image batch as one forward of 2B samples (their token
counts are equal; an edit's are not), and `masked_text_loss` computes the text head only at the masked positions
(under SUBS the others carry no loss), in chunks, without the (B, L, vocab) float32 tensors.
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
from unialignment.diffusion.draws import MicroStepDraws
from unialignment.diffusion.flow_matching import (
    add_noise,
    apply_condition_dropout,
    draw_condition_dropout,
    flow_matching_loss,
    sample_timesteps,
)
from unialignment.diffusion.masked_diffusion import (
    LogLinearSchedule,
    mask_tokens,
    masked_diffusion_loss,
    masked_diffusion_loss_from_hidden_states,
    masked_positions,
    sample_antithetic_times,
    scored_tokens,
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

    def detached(self) -> dict[str, torch.Tensor]:
        """Every term, detached, in float64 (so sums match those of `scalars`), left on the device (no
        synchronisation)."""
        return {f.name: getattr(self, f.name).detach().double() for f in fields(self)}


class UniAlignmentObjective:
    """Computes `UniAlignmentLosses` for a model and a batch; holds no trainable state.

    Args:
        scheduler: the training `FlowMatchEulerDiscreteScheduler` (shift 1.0 in the reference).
        mask_token_id: T5's `<extra_id_0>` id, looked up from the tokenizer.
        encode_text_ids: frozen T5, (B, L) ids -> (B, L, D_t5) states, called without gradient.
        null_prompt_embeds: (1, L, D_t5) T5 states of " ", used for condition dropout.
        fuse_t2i_passes: one forward of 2B samples for both passes of a batch without condition images.
        masked_text_loss: the text head at masked positions only, `text_loss_chunk_size` positions at a time. Reads
            the head's weight directly, so the weight must be whole on each rank (ZeRO 0-2, no LoRA on the head).
    """

    def __init__(
        self,
        config: ObjectiveConfig,
        scheduler: FlowMatchEulerDiscreteScheduler,
        mask_token_id: int,
        encode_text_ids: Callable[[torch.Tensor], torch.Tensor],
        null_prompt_embeds: torch.Tensor,
        fuse_t2i_passes: bool = False,
        masked_text_loss: bool = False,
        text_loss_chunk_size: int = 4096,
    ):
        self.config = config
        self.scheduler = scheduler
        self.mask_token_id = mask_token_id
        self.encode_text_ids = encode_text_ids
        self.null_prompt_embeds = null_prompt_embeds
        self.fuse_t2i_passes = fuse_t2i_passes
        self.masked_text_loss = masked_text_loss
        self.text_loss_chunk_size = text_loss_chunk_size
        self.text_schedule = LogLinearSchedule(eps=config.text_schedule_eps)

    def draw(
        self,
        latent_shape: torch.Size,
        caption_ids: torch.Tensor,
        score_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MicroStepDraws:
        """Every random number of a micro-step, on the CPU, in the order the plain path draws them: image timesteps,
        image noise, condition dropout, text times, text masks. `caption_ids` and the masks: the CPU tensors of the
        batch's caption."""
        config = self.config
        batch_size = latent_shape[0]
        timesteps, sigmas = sample_timesteps(
            self.scheduler,
            batch_size,
            config.weighting_scheme,
            config.logit_mean,
            config.logit_std,
            config.mode_scale,
            generator=generator,
        )
        noise = randn_tensor(latent_shape, generator=generator, dtype=torch.float32)
        dropped = draw_condition_dropout(batch_size, config.condition_dropout, generator)
        text_times = sample_antithetic_times(batch_size, config.text_sampling_eps, generator=generator)
        noisy_ids = mask_tokens(
            caption_ids, self.text_schedule.mask_probability(text_times), self.mask_token_id, score_mask, generator
        )
        scored, _ = scored_tokens(caption_ids, score_mask, attention_mask, config.text_loss_normalization)
        masked_index = masked_positions(noisy_ids, scored, self.mask_token_id)
        return MicroStepDraws(timesteps, sigmas, noise, dropped, text_times, noisy_ids, masked_index)

    def __call__(
        self, model: UniAlignmentTransformer, batch: TrainingBatch, generator: torch.Generator | None = None
    ) -> UniAlignmentLosses:
        """The batch's draws if it carries them (drawn ahead), else drawn here from `generator`, a CPU generator:
        every random draw (timesteps, noise, dropout, masks) is made on the CPU and moved, so a run is reproducible
        across devices and resumable from the generator state."""
        weights = self.config.weights
        device = batch.target_latents.device
        draws = batch.draws
        if draws is None:

            def host(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return None if tensor is None else tensor.cpu()

            draws = self.draw(
                batch.target_latents.shape,
                host(batch.caption_ids),
                host(batch.caption_score_mask),
                host(batch.caption_attention_mask),
                generator,
            )
        draws = draws.to(device)
        want_contrastive = weights.contrastive > 0
        want_align = (weights.align_image > 0 and batch.teacher_image_targets is not None) or (
            weights.align_text > 0 and batch.teacher_text_targets is not None
        )
        # 1. and 2.: the image-stream and the text-stream pass.
        if self.fuse_t2i_passes and self._fusable(batch):
            image_loss, image_pass, text_loss, text_pass = self.fused_streams(
                model, batch, draws, want_contrastive, want_align
            )
        else:
            image_loss, image_pass = self.image_stream(model, batch, draws, want_contrastive, want_align)
            text_loss, text_pass = self.text_stream(model, batch, draws, want_contrastive, want_align)

        # 3. Cross-modal alignment: final image states of pass 1 against final text states of pass 2.
        zero = torch.zeros((), device=device)
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
        draws: MicroStepDraws,
        return_hidden_states: bool,
        return_alignment: bool,
    ) -> tuple[torch.Tensor, UniAlignmentTransformerOutput]:
        """Rectified flow on the target, condition images clean: (the loss, the pass's outputs)."""
        noisy_latents, prompt_embeds = self._image_stream_inputs(batch, draws)
        image_pass = model(
            noisy_latents,
            prompt_embeds,
            draws.timesteps,
            batch.condition_latents,
            return_hidden_states=return_hidden_states,
            return_alignment=return_alignment,
        )
        return self._image_loss(image_pass.velocity, noisy_latents, batch, draws), image_pass

    def text_stream(
        self,
        model: UniAlignmentTransformer,
        batch: TrainingBatch,
        draws: MicroStepDraws,
        return_hidden_states: bool,
        return_alignment: bool,
    ) -> tuple[torch.Tensor, UniAlignmentTransformerOutput]:
        """MDLM on the caption, the clean image (or the null image) at timestep 0: (the loss, the pass's outputs)."""
        noisy_text_embeds = self._noisy_text_embeds(batch, draws)
        if batch.text_stream_uses_null_image:
            text_stream_latents = None
        else:
            text_stream_latents = (
                batch.target_latents if batch.text_stream_latents is None else batch.text_stream_latents
            )
        text_pass = model(
            text_stream_latents,
            noisy_text_embeds,
            torch.zeros(batch.target_latents.shape[0], device=batch.target_latents.device),
            return_velocity=False,
            return_text_logits=not self.masked_text_loss,
            return_hidden_states=return_hidden_states or self.masked_text_loss,
            return_alignment=return_alignment,
        )
        return self._text_loss(model, text_pass, batch, draws), text_pass

    def fused_streams(
        self,
        model: UniAlignmentTransformer,
        batch: TrainingBatch,
        draws: MicroStepDraws,
        return_hidden_states: bool,
        return_alignment: bool,
    ) -> tuple[torch.Tensor, UniAlignmentTransformerOutput, torch.Tensor, UniAlignmentTransformerOutput]:
        """Both passes of a batch without condition images as one forward of 2B samples, the image stream's first:
        joint attention, the blocks and the heads act on each sample alone, so the halves are the two passes."""
        noisy_latents, prompt_embeds = self._image_stream_inputs(batch, draws)
        noisy_text_embeds = self._noisy_text_embeds(batch, draws)
        clean_latents = batch.target_latents if batch.text_stream_latents is None else batch.text_stream_latents
        both = model(
            torch.cat([noisy_latents, clean_latents.to(noisy_latents.dtype)]),
            torch.cat([prompt_embeds, noisy_text_embeds]),
            torch.cat([draws.timesteps, torch.zeros_like(draws.timesteps)]),
            return_text_logits=not self.masked_text_loss,
            return_hidden_states=return_hidden_states or self.masked_text_loss,
            return_alignment=return_alignment,
        )
        size = noisy_latents.shape[0]
        halves = [{}, {}]
        for name, value in both.items():
            halves[0][name], halves[1][name] = value[:size], value[size:]
        image_pass = UniAlignmentTransformerOutput(**halves[0])
        text_pass = UniAlignmentTransformerOutput(**halves[1])
        image_loss = self._image_loss(image_pass.velocity, noisy_latents, batch, draws)
        return image_loss, image_pass, self._text_loss(model, text_pass, batch, draws), text_pass

    @staticmethod
    def _fusable(batch: TrainingBatch) -> bool:
        """Whether both passes see the same number of image tokens: no condition images, and a real image (not the
        null image) of the target's size in the text stream."""
        if batch.condition_latents or batch.text_stream_uses_null_image:
            return False
        return batch.text_stream_latents is None or batch.text_stream_latents.shape == batch.target_latents.shape

    def _image_stream_inputs(self, batch: TrainingBatch, draws: MicroStepDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy target latents and the condition text's states after dropout."""
        noisy_latents = add_noise(batch.target_latents, draws.noise.to(batch.target_latents.dtype), draws.sigmas)
        prompt_embeds = apply_condition_dropout(
            batch.prompt_embeds, self.null_prompt_embeds.to(batch.prompt_embeds.device), draws.dropped
        )
        return noisy_latents, prompt_embeds

    def _image_loss(
        self, velocity: torch.Tensor, noisy_latents: torch.Tensor, batch: TrainingBatch, draws: MicroStepDraws
    ) -> torch.Tensor:
        return flow_matching_loss(
            velocity, noisy_latents, batch.target_latents, draws.sigmas, self.config.weighting_scheme
        )

    def _noisy_text_embeds(self, batch: TrainingBatch, draws: MicroStepDraws) -> torch.Tensor:
        with torch.no_grad():
            return self.encode_text_ids(draws.noisy_ids).to(batch.prompt_embeds.dtype)

    def _text_loss(
        self,
        model: UniAlignmentTransformer,
        text_pass: UniAlignmentTransformerOutput,
        batch: TrainingBatch,
        draws: MicroStepDraws,
    ) -> torch.Tensor:
        sigma, dsigma = self.text_schedule.sigma(draws.text_times), self.text_schedule.dsigma(draws.text_times)
        common = dict(
            score_mask=batch.caption_score_mask,
            attention_mask=batch.caption_attention_mask,
            normalization=self.config.text_loss_normalization,
        )
        if not self.masked_text_loss:
            log_probs = subs_log_probs(text_pass.text_logits, draws.noisy_ids, self.mask_token_id)
            return masked_diffusion_loss(log_probs, batch.caption_ids, sigma, dsigma, **common).loss
        head = _unwrapped(model).text_proj_out
        return masked_diffusion_loss_from_hidden_states(
            text_pass.text_hidden_states,
            head.weight,
            head.bias,
            draws.noisy_ids,
            batch.caption_ids,
            sigma,
            dsigma,
            self.mask_token_id,
            chunk_size=self.text_loss_chunk_size,
            masked_index=draws.masked_index,
            **common,
        ).loss


def _unwrapped(model: torch.nn.Module) -> UniAlignmentTransformer:
    """The transformer inside a DeepSpeed engine (or the transformer itself)."""
    return getattr(model, "module", model)
