"""UniAlignmentPipeline: one MMDiT for text-to-image, editing and perception, composition, captioning and VQA.

UniAlignment (Song et al. 2025, arXiv:2509.23760) samples images with the image stream (rectified flow, Euler over
the scheduler's sigmas, classifier-free guidance; docs/METHOD.md section 3) and texts with the text stream (MDLM
ancestral sampling with the SUBS parameterisation and the no-change cache; docs/METHOD.md section 4). Each task is
its own method; `__call__` is text-to-image, as in every diffusers text-to-image pipeline.

Everything is derived from the five registered components: the latent scaling from `vae.config`, the VAE
downsampling from `vae.config.block_out_channels`, the mask token from the tokenizer, the sigmas from the
scheduler's own config (SD3-medium ships shift 3.0; training used shift 1.0), the prompt length from the tokenizer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase, T5EncoderModel

from unialignment.data.transforms import resize_and_center_crop, size_multiple, to_pixels
from unialignment.diffusion.flow_matching import sample_rectified_flow
from unialignment.diffusion.masked_diffusion_sampler import (
    SamplerNoise,
    initial_ids_from_prompt,
    sample_masked_diffusion,
)
from unialignment.errors import UserError
from unialignment.files import model_folder
from unialignment.frozen.text_encoder import (
    MASK_EMBEDDING_FILE,
    FrozenT5,
    apply_mask_embedding,
    load_t5_tokenizer,
    text_length_of,
    tokenize_captions,
)
from unialignment.frozen.vae import downsample_factor, pixels_to_pil, scale_latents, unscale_latents
from unialignment.models import UniAlignmentTransformer

logger = logging.get_logger(__name__)

NULL_PROMPT = " "  # the unconditional prompt of training's condition dropout: the default negative prompt
OUTPUT_TYPES = ("pil", "np", "latent")

Generator = torch.Generator | list[torch.Generator] | None
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
# What each component entry of `model_index.json` may name (library, classes); the transformer is always ours.
COMPONENT_CLASSES = {
    "scheduler": ("diffusers", {"FlowMatchEulerDiscreteScheduler"}),
    "vae": ("diffusers", {"AutoencoderKL"}),
    "text_encoder": ("transformers", {"T5EncoderModel"}),
    "tokenizer": ("transformers", {"T5Tokenizer", "T5TokenizerFast"}),
}


@dataclass
class UniAlignmentImageOutput(BaseOutput):
    """images: "pil": a list of RGB images; "np": (N, H, W, 3) float32 in [0, 1]; "latent": (N, C, h, w) scaled
    latents, as the transformer sees them."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


@dataclass
class UniAlignmentTextOutput(BaseOutput):
    """texts: one caption or answer per image, without the question, `</s>`, padding or mask tokens."""

    texts: list[str]


class UniAlignmentPipeline(DiffusionPipeline):
    """Text-to-image (`text_to_image`, also `__call__`), instruction editing and perception (`edit`), composition
    (`compose`), captioning (`caption`) and visual question answering (`answer`) with one UniAlignment transformer.

    Reproducibility: initial noise comes from `randn_tensor`, so `generator` may be one generator or a list with one
    per image, on the CPU or on the device. With a list, a batched call gives each image what a call for that image
    alone with its generator gives; one generator for a batch draws the batch's noise in one go, which differs.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: UniAlignmentTransformer,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self._check_components()
        self._null_prompt_cache: tuple | None = None  # (the text encoder, its settings, the states)

    # --- what the components imply ------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling of the VAE: 8 for SD3's four-level encoder."""
        return downsample_factor(self.vae.config)

    @property
    def size_multiple(self) -> int:
        """Heights and widths must be multiples of this: VAE downsampling x transformer patch size (16 for SD3)."""
        return size_multiple(self.vae_scale_factor, self.transformer.config.patch_size)

    @property
    def text_max_length(self) -> int:
        """Prompt length in T5 tokens, as the tokenizer records it (`text_length_of`): the run's text length."""
        return text_length_of(self.tokenizer)

    def _frozen_t5(self) -> FrozenT5:
        # The training code's view of the tokenizer and encoder, so prompts are tokenized as in training and texts
        # decoded as the trainer decodes them. Built per call: cheap, and never stale after a component is swapped.
        return FrozenT5(self.tokenizer, self.text_encoder, max_length=self.text_max_length)

    def _check_components(self) -> None:
        transformer_config = self.transformer.config
        if transformer_config.in_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"The transformer takes {transformer_config.in_channels} latent channels but the VAE makes "
                f"{self.vae.config.latent_channels}."
            )
        if transformer_config.joint_attention_dim != self.text_encoder.config.d_model:
            raise ValueError(
                f"The transformer reads {transformer_config.joint_attention_dim}-wide text states but the text encoder "
                f"makes {self.text_encoder.config.d_model}."
            )
        if transformer_config.vocab_size != len(self.tokenizer):
            raise ValueError(
                f"The transformer's text head has {transformer_config.vocab_size} entries but the tokenizer has "
                f"{len(self.tokenizer)} tokens."
            )
        self._frozen_t5()  # pad = EOS, a mask token, an encoder that embeds every token id

    # --- loading ----------------------------------------------------------------------------------------------------

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' reading of `model_index.json`, with every entry checked against the classes a UniAlignment
        pipeline is made of, so that no code a folder names is ever imported.

        The authors' index names their own pipeline class and `SD3JointModelFlexible` from a library we do not have.
        Passing our transformer to `from_pretrained` is not enough: diffusers still imports the index's library to
        check the object's type. `from_pretrained` loads the transformer itself, so the index is read as naming ours,
        and the pipeline class is ours. Any other component must name its expected class (an index naming, say,
        `["os", "system"]` is refused), and entries the pipeline has no use for are dropped unread.
        """
        loaded = super().load_config(pretrained_model_name_or_path, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config["_class_name"] = cls.__name__  # never a custom pipeline file of the folder's
        if "transformer" in config:
            config["transformer"] = [UniAlignmentTransformer.__module__, UniAlignmentTransformer.__name__]
        for name in [key for key, value in config.items() if isinstance(value, list | tuple) and key != "transformer"]:
            entry = config[name]
            if name not in COMPONENT_CLASSES:
                del config[name]
                continue
            library, classes = COMPONENT_CLASSES[name]
            if len(entry) != 2 or entry[0] != library or entry[1] not in classes:
                raise UserError(
                    f"{pretrained_model_name_or_path}/model_index.json names {name} = {list(entry)}; a UniAlignment "
                    f"pipeline's {name} is {library}.{' or '.join(sorted(classes))}, and nothing else is loaded from "
                    "a model folder"
                )
        return loaded

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        torch_dtype: torch.dtype | None = None,
        mask_embedding: str | Path | None = "auto",
        **kwargs,
    ) -> UniAlignmentPipeline:
        """Load a local pipeline folder: ours (`save_pretrained`) or the authors' released layout.

        The transformer is loaded strictly with `UniAlignmentTransformer.from_pretrained` (the authors' config names
        `SD3JointModelFlexible`) and the tokenizer with `load_t5_tokenizer` (pad = EOS); pass `transformer=` or
        `tokenizer=` to use objects of your own. Scheduler, VAE and text encoder load through diffusers.

        mask_embedding: "auto" loads the folder's `mask_token_emb.00-of-01.pth` when there is one; a path loads that
            file (it must exist); None keeps the text encoder's own row. The embedding replaces the mask token's row
            of the text encoder's input embedding.
        """
        path = model_folder(pretrained_model_name_or_path, "pipeline")  # a hub repo id: its cached snapshot
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a local pipeline folder: it has no model_index.json.")
        if mask_embedding == "auto":
            mask_embedding = path / MASK_EMBEDDING_FILE if (path / MASK_EMBEDDING_FILE).is_file() else None
        if kwargs.get("transformer") is None:
            kwargs["transformer"] = UniAlignmentTransformer.from_pretrained(
                path / "transformer", torch_dtype=torch_dtype
            )
        if kwargs.get("text_encoder") is None:
            # The training code's loader: pad = EOS, the text length the folder's tokenizer records, the mask row.
            t5 = FrozenT5.from_pretrained(
                path / "tokenizer",
                path / "text_encoder",
                torch_dtype or torch.float32,
                mask_embedding_path=mask_embedding,
                max_length=None,
            )
            kwargs["text_encoder"] = t5.encoder
            kwargs["tokenizer"] = kwargs.get("tokenizer") or t5.tokenizer
        else:
            if kwargs.get("tokenizer") is None:
                kwargs["tokenizer"] = load_t5_tokenizer(path / "tokenizer")
            if mask_embedding is not None:
                apply_mask_embedding(kwargs["text_encoder"], kwargs["tokenizer"], mask_embedding)
        return super().from_pretrained(path, dtype=torch_dtype, **kwargs)

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> None:
        """LoRA adapters for the transformer, in diffusers' LoRA file layout (`pytorch_lora_weights.safetensors`,
        `transformer.`-prefixed tensors, the adapter's rank and alpha in the file's metadata): a training run's
        LoRA export, or the one a pipeline export keeps beside the base weights. `path`: the file or its folder."""
        path = Path(path)
        folder, weight_name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHTS)
        if not (folder / weight_name).is_file():
            raise UserError(f"no LoRA weights at {folder / weight_name}")
        self.transformer.load_lora_adapter(
            folder, weight_name=weight_name, prefix="transformer", adapter_name=adapter_name
        )

    def enable_fast_sampling(
        self, compile_blocks: bool = True, cuda_graphs: bool = False, channels_last_vae: bool = True
    ) -> None:
        """Sampling speed-ups, each giving the eager images within bf16 tolerance (BENCHMARKS.md has their timings):

        compile_blocks: `torch.compile` of each joint block (regional: compiles in seconds, shared by the blocks;
            a new resolution or batch recompiles a block, not the model).
        cuda_graphs: compile with `mode="reduce-overhead"`, replaying CUDA graphs of the blocks, which removes
            the kernel launches that dominate small batches; shapes must repeat (fixed size and batch), and each
            new shape records new graphs.
        channels_last_vae: the VAE's convolutions in channels-last memory order, faster with cuDNN.
        """
        if compile_blocks or cuda_graphs:
            self.transformer.compile_blocks(mode="reduce-overhead" if cuda_graphs else None)
        if channels_last_vae:
            self.vae.to(memory_format=torch.channels_last)

    # --- image tasks ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_to_image(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
    ) -> UniAlignmentImageOutput:
        """Images from prompts: `num_images_per_prompt` per prompt, in prompt order.

        negative_prompt: the unconditional half of classifier-free guidance, one for all prompts or one per prompt;
            default the null prompt " ", as in training's condition dropout. guidance_scale <= 1 turns guidance off.
        generator: one generator, or one per image (len(prompts) x num_images_per_prompt).
        """
        prompts = _texts(prompt, "prompt")
        return self._generate_images(
            prompts,
            negative_prompt,
            None,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            output_type=output_type,
        )

    __call__ = text_to_image

    @torch.no_grad()
    def edit(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image],
        instruction: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 28,
        guidance_scale: float = 9.0,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
    ) -> UniAlignmentImageOutput:
        """Instruction editing and perception ("Provide a depth map of the scene."): one instruction per source image.

        Each source is resized and centre-cropped to (height, width), as in training, and its clean latent is the
        condition of both guidance halves: guidance contrasts the instruction with the null prompt, not the image.
        """
        images = _images(image, "image")
        instructions = _texts(instruction, "instruction")
        _check_same_length("image", images, "instruction", instructions)
        conditions = [[source] for source in images]
        return self._generate_images(
            instructions,
            negative_prompt,
            conditions,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            output_type=output_type,
        )

    @torch.no_grad()
    def compose(
        self,
        images: list[PIL.Image.Image] | list[list[PIL.Image.Image]],
        instruction: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 28,
        guidance_scale: float = 9.0,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        output_type: str = "pil",
    ) -> UniAlignmentImageOutput:
        """Composition of k source images: `images` is one composition (a list of k images) or a batch of them (a
        list of such lists, the same k each), with one instruction per composition. The k clean latents are the
        conditions, in order, of both guidance halves."""
        compositions = _compositions(images)
        instructions = _texts(instruction, "instruction")
        _check_same_length("composition", compositions, "instruction", instructions)
        return self._generate_images(
            instructions,
            negative_prompt,
            compositions,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            output_type=output_type,
        )

    def _generate_images(
        self,
        prompts: list[str],
        negative_prompt: str | list[str] | None,
        condition_images: list[list[PIL.Image.Image]] | None,
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        num_images_per_prompt: int,
        generator: Generator,
        output_type: str,
    ) -> UniAlignmentImageOutput:
        """Rectified-flow sampling shared by the image tasks; condition_images: k sources per prompt, or None."""
        # 1. check inputs
        self._check_size(height, width)
        _check_positive(num_inference_steps=num_inference_steps, num_images_per_prompt=num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        negative_prompts = _negative_prompts(negative_prompt, len(prompts))
        batch_size = len(prompts) * num_images_per_prompt
        _check_generators(generator, batch_size)
        device, dtype = self._execution_device, self.transformer.dtype
        use_guidance = guidance_scale > 1.0

        # 2. encode prompts: [negative; positive] in one batch, the order `sample_rectified_flow` expects
        prompt_embeds = self._encode_texts(negative_prompts + prompts if use_guidance else prompts, device, dtype)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

        # 3. encode condition images: clean latents, the same in both guidance halves
        condition_latents = None
        if condition_images is not None:
            latents = self._encode_compositions(condition_images, height, width, device, dtype)
            halves = 2 if use_guidance else 1
            condition_latents = [
                x.repeat_interleave(num_images_per_prompt, dim=0).repeat(halves, 1, 1, 1) for x in latents
            ]

        # 4. prepare the initial noise; float32 so the Euler steps accumulate in full precision in any model dtype
        latent_shape = (
            batch_size,
            self.transformer.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)

        # 5. denoise
        def velocity(latent_input: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            output = self.transformer(
                hidden_states=latent_input.to(dtype),
                encoder_hidden_states=prompt_embeds,
                timestep=timesteps,
                condition_latents=condition_latents,
            )
            return output.velocity.float()

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            latents = sample_rectified_flow(
                velocity, latents, self.scheduler, num_inference_steps, guidance_scale, progress=_ticking(progress_bar)
            )

        # 6. decode
        images = latents if output_type == "latent" else self._decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        return UniAlignmentImageOutput(images=images)

    # --- text tasks -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def caption(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image],
        length: int = 256,
        num_inference_steps: int = 64,
        height: int = 512,
        width: int = 512,
        generator: Generator = None,
        sampler: SamplerNoise = "unmask_first",
    ) -> UniAlignmentTextOutput:
        """A caption per image from the text stream: `length` mask tokens denoised in `num_inference_steps` steps,
        with the clean image (resized and centre-cropped to (height, width)) in the image stream at timestep 0.

        generator: one generator for the batch, or one per image; with one per image, each caption is the one that
            image would get alone with its generator, and the batch still runs as one. Its random numbers are drawn
            where it lives (pass a generator on the device to draw them there).
        sampler: how each step draws (the same distribution either way): "unmask_first" draws per position whether
            it unmasks and then its token, only where it does; "gumbel" draws Gumbel noise over the whole
            vocabulary at every position, and reproduces the captions of earlier versions for the same seed.
        """
        images = _images(image, "image")
        return self._sample_texts(images, None, length, num_inference_steps, height, width, generator, sampler)

    @torch.no_grad()
    def answer(
        self,
        image: PIL.Image.Image | list[PIL.Image.Image],
        question: str | list[str],
        length: int = 256,
        num_inference_steps: int = 64,
        height: int = 512,
        width: int = 512,
        generator: Generator = None,
        sampler: SamplerNoise = "unmask_first",
    ) -> UniAlignmentTextOutput:
        """An answer per (image, question): the question's tokens are the clean prefix of the `length` text tokens
        (the prompted variant of training), the rest is sampled; only the answer is returned. See `caption`."""
        images = _images(image, "image")
        questions = _texts(question, "question")
        _check_same_length("image", images, "question", questions)
        return self._sample_texts(images, questions, length, num_inference_steps, height, width, generator, sampler)

    def _sample_texts(
        self,
        images: list[PIL.Image.Image],
        questions: list[str] | None,
        length: int,
        num_inference_steps: int,
        height: int,
        width: int,
        generator: Generator,
        sampler: SamplerNoise,
    ) -> UniAlignmentTextOutput:
        """Masked-diffusion sampling shared by the text tasks; questions: the clean prefix of each text, or None."""
        # 1. check inputs
        self._check_size(height, width)
        _check_positive(num_inference_steps=num_inference_steps)
        _check_generators(generator, len(images))
        device, dtype = self._execution_device, self.transformer.dtype
        t5 = self._frozen_t5()

        # 2. encode the images: clean latents, the text stream's image at timestep 0
        image_latents = self._encode_images(images, height, width, device, dtype)

        # 3. prepare the text: all mask tokens after the question. An empty answer after each question makes the
        # score mask mark every position after it.
        prompt = tokenize_captions(self.tokenizer, [""] * len(images), questions, max_length=length)
        if prompt.num_truncated:
            logger.warning(f"{prompt.num_truncated} question(s) cut to fit {length} tokens with room for an answer.")
        question_mask = ~prompt.score_mask
        initial_ids = initial_ids_from_prompt(prompt.input_ids, question_mask, t5.mask_token_id)
        # Every caption starts from the same all-mask text: its T5 states are computed for one row.
        same_start = bool((initial_ids == initial_ids[:1]).all())  # on the host, before the ids move
        initial_ids = initial_ids.to(device)

        # 4. denoise: one sampler run for the batch; with a generator per image, each row draws its own noise and
        # samples what it would alone
        timestep = torch.zeros(image_latents.shape[0], device=device)
        first_call = [True]

        def text_logits(noisy_ids: torch.Tensor) -> torch.Tensor:
            if first_call[0] and same_start:
                states = self.text_encoder(noisy_ids[:1]).last_hidden_state
                noisy_text_embeds = states.expand(noisy_ids.shape[0], -1, -1).to(dtype)
            else:
                noisy_text_embeds = self.text_encoder(noisy_ids).last_hidden_state.to(dtype)
            first_call[0] = False
            output = self.transformer(
                hidden_states=image_latents,
                encoder_hidden_states=noisy_text_embeds,
                timestep=timestep,
                return_velocity=False,
                return_text_logits=True,
            )
            return output.text_logits.float()

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            sampled_ids = sample_masked_diffusion(
                text_logits,
                initial_ids,
                t5.mask_token_id,
                num_inference_steps,
                generator=generator,
                progress=_ticking(progress_bar),
                noise=sampler,
            ).token_ids

        # 5. decode the answers: the question positions are dropped, then every `</s>`, pad and mask token
        question_lengths = question_mask.sum(dim=1).tolist()
        answer_ids = [ids[n:] for ids, n in zip(sampled_ids.tolist(), question_lengths, strict=True)]
        texts = t5.decode(answer_ids)
        self.maybe_free_model_hooks()
        return UniAlignmentTextOutput(texts=texts)

    # --- components at work -----------------------------------------------------------------------------------------

    def _check_size(self, height: int, width: int) -> None:
        multiple, patch_size = self.size_multiple, self.transformer.config.patch_size
        max_patches = self.transformer.config.pos_embed_max_size
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, int) or side <= 0 or side % multiple:
                raise ValueError(
                    f"{name} must be a positive multiple of {multiple} (VAE downsampling {self.vae_scale_factor} x "
                    f"patch size {patch_size}), got {side!r}."
                )
            if max_patches is not None and side > max_patches * multiple:
                raise ValueError(
                    f"{name} {side} is larger than the transformer's positional embedding covers "
                    f"({max_patches} patches = {max_patches * multiple} pixels)."
                )

    def _encode_texts(self, texts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """T5 states (N, text_max_length, D), padded with EOS and encoded without an attention mask, as in training
        and in SD3's pipeline. The null prompt's states (the default negative prompt) are computed once per pipeline
        and text encoder and reused; only the other texts go through T5."""
        states = [None] * len(texts)
        others = [index for index, text in enumerate(texts) if text != NULL_PROMPT]
        if len(others) < len(texts):
            null = self._null_prompt_states(device)
            for index in set(range(len(texts))) - set(others):
                states[index] = null
        if others:
            tokens = self._frozen_t5().tokenize([texts[index] for index in others])
            if tokens.num_truncated:
                logger.warning(
                    f"{tokens.num_truncated} prompt(s) longer than {self.text_max_length} T5 tokens were cut."
                )
            encoded = self.text_encoder(tokens.input_ids.to(device)).last_hidden_state
            for index, row in zip(others, encoded, strict=True):
                states[index] = row
        return torch.stack(states).to(dtype)

    def _null_prompt_states(self, device: torch.device) -> torch.Tensor:
        """(text_max_length, D) T5 states of the null prompt, cached for this text encoder (module), prompt length,
        device and dtype. Changing the encoder's weights in place is not seen: assign a new text encoder instead."""
        encoder = self.text_encoder
        key = (self.text_max_length, str(device), encoder.dtype)
        cached = self._null_prompt_cache
        if cached is None or cached[0]() is not encoder or cached[1] != key:
            ids = self._frozen_t5().tokenize([NULL_PROMPT]).input_ids
            states = encoder(ids.to(device)).last_hidden_state[0]
            self._null_prompt_cache = cached = (weakref.ref(encoder), key, states)
        return cached[2]

    def _encode_images(
        self, images: list[PIL.Image.Image], height: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Images resized and centre-cropped to (height, width), as in training -> scaled latents (N, C, h, w).

        The posterior mean, not a draw: a condition or captioned image should be the image itself, not a noisy copy.
        """
        pixels = torch.stack([to_pixels(resize_and_center_crop(image, height, width)) for image in images])
        raw_latents = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist.mean
        return scale_latents(raw_latents, self.vae.config).to(dtype)

    def _encode_compositions(
        self,
        compositions: list[list[PIL.Image.Image]],
        height: int,
        width: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        """B compositions of k images -> k condition latents (B, C, h, w), encoded in one VAE batch."""
        num_sources = len(compositions[0])
        flat = [image for composition in compositions for image in composition]
        latents = self._encode_images(flat, height, width, device, dtype)
        return list(latents.unflatten(0, (len(compositions), num_sources)).unbind(dim=1))

    def _decode_latents(self, latents: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray:
        raw_latents = unscale_latents(latents, self.vae.config).to(self.vae.dtype)
        if self.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):  # enable_fast_sampling
            raw_latents = raw_latents.to(memory_format=torch.channels_last)
        pixels = self.vae.decode(raw_latents).sample.clamp(-1.0, 1.0)  # (N, 3, H, W)
        if output_type == "pil":
            return pixels_to_pil(pixels)
        return ((pixels.float() + 1.0) / 2.0).permute(0, 2, 3, 1).cpu().numpy()


# --- input checks --------------------------------------------------------------------------------------------------


def _texts(texts: str | Sequence[str], name: str) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError(f"{name} is an empty list; pass at least one.")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}] must be a string, got {type(text).__name__}.")
        if not text.strip():
            raise ValueError(f"{name}[{index}] is empty ({text!r}); give a non-empty {name}.")
    return texts


def _images(images: PIL.Image.Image | Sequence[PIL.Image.Image], name: str) -> list[PIL.Image.Image]:
    images = [images] if isinstance(images, PIL.Image.Image) else list(images)
    if not images:
        raise ValueError(f"{name} is an empty list; pass at least one image.")
    for index, image in enumerate(images):
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"{name}[{index}] must be a PIL image, got {type(image).__name__}.")
    return images


def _compositions(images: Sequence[PIL.Image.Image] | Sequence[Sequence[PIL.Image.Image]]) -> list[list]:
    if isinstance(images, PIL.Image.Image) or not images:
        raise ValueError("images must be a non-empty list of PIL images (one composition) or a list of such lists.")
    compositions = [images] if isinstance(images[0], PIL.Image.Image) else images
    compositions = [_images(composition, f"images[{index}]") for index, composition in enumerate(compositions)]
    num_sources = sorted({len(composition) for composition in compositions})
    if len(num_sources) > 1:
        raise ValueError(f"every composition of a batch needs the same number of source images, got {num_sources}.")
    return compositions


def _negative_prompts(negative_prompt: str | Sequence[str] | None, batch_size: int) -> list[str]:
    if negative_prompt is None:
        return [NULL_PROMPT] * batch_size
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch_size
    negative_prompts = list(negative_prompt)
    if len(negative_prompts) != batch_size:
        raise ValueError(
            f"got {len(negative_prompts)} negative prompts for {batch_size} prompts; pass one or one each."
        )
    return negative_prompts


def _check_same_length(name: str, items: list, other_name: str, others: list) -> None:
    if len(items) != len(others):
        raise ValueError(f"got {len(items)} {name}(s) and {len(others)} {other_name}(s); pass one {other_name} each.")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_generators(generator: Generator, batch_size: int) -> None:
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for {batch_size} outputs; pass one generator or one each.")


def _ticking(progress_bar) -> Callable[[Iterable], Iterator]:
    """A `progress` callable for the samplers: passes their steps through and ticks the bar once per step."""

    def progress(steps: Iterable) -> Iterator:
        for step in steps:
            yield step
            progress_bar.update()

    return progress
