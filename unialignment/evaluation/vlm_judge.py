"""A chat vision-language model as a judge: one question about a few images, one text answer.

Loaded through transformers (`AutoProcessor` and `AutoModelForImageTextToText`), so any local chat VLM folder with
a chat template serves; SemGen-Bench (UniAlignment, Song et al. 2025, arXiv:2509.23760) was scored by the authors
with Qwen2.5-VL-72B-Instruct-AWQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


class JudgeError(ValueError):
    """A judge folder that cannot serve as a chat VLM judge."""


class VLMJudge:
    """A chat vision-language model, loaded through transformers, answering one question about some images.

    The first answer is greedy; a retry (`seed` given) samples at `temperature` from a seeded generator, since a
    greedy retry would repeat the unreadable answer word for word.
    """

    def __init__(
        self, model, processor, chat_template: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7
    ):
        self.model = model.eval()
        self.processor = processor
        self.chat_template = chat_template  # None: the processor's own
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | None = None, dtype: str | torch.dtype = "auto", **kwargs
    ) -> VLMJudge:
        """Load a local chat VLM folder (Qwen2.5-VL or any model `AutoModelForImageTextToText` knows). Without
        `device`, the model is spread over the visible GPUs (`device_map="auto"`, as a 72B judge needs), or put
        on the CPU when there are none."""
        from transformers import AutoModelForImageTextToText

        from unialignment.frozen.components import DTYPES

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise JudgeError(f"{folder} is not a model folder (no config.json); give --judge a local chat VLM folder")
        processor = load_processor(folder)
        chat_template = None
        if not processor.chat_template:
            chat_template = getattr(processor.tokenizer, "chat_template", None)
            if not chat_template:
                raise JudgeError(f"{folder} has no chat template (chat_template.jinja or .json): is it a chat model?")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = DTYPES[dtype]
        device_map = "auto" if device is None and torch.cuda.is_available() else None
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=dtype, device_map=device_map, local_files_only=True
        )
        if device_map is None:
            model.to(device or "cpu")
        return cls(model, processor, chat_template, **kwargs)

    @torch.no_grad()
    def ask(self, images: Sequence[Image.Image], question: str, seed: int | None = None) -> str:
        """The model's answer to `question` about `images` (shown in order, before the question)."""
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
        inputs = self.processor(images=list(images), text=[prompt], return_tensors="pt").to(self.model.device)
        inputs = inputs.to(self.model.dtype)  # floating tensors only: pixel values, not token ids
        if seed is None:
            options = dict(do_sample=False)
        else:
            # top_k 0 and top_p 1 turn off a checkpoint's own near-greedy defaults (Qwen2.5-VL ships top_k 1).
            options = dict(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the caller's random streams are left as they were
            if seed is not None:
                torch.manual_seed(seed)
            output_ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **options)
        new_ids = output_ids[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_ids, skip_special_tokens=True)[0].strip()


def load_processor(folder: Path):
    """`AutoProcessor` for `folder`; for a processor with a video part that cannot be built, the same processor
    class without it."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    try:
        return AutoProcessor.from_pretrained(folder, local_files_only=True)
    except ImportError as error:
        # transformers 5 builds every part of a VLM's processor, and Qwen2-VL's video processor needs torchvision,
        # which this project does not install (README, Dependencies). The judge only sees still images.
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if type(config) not in PROCESSOR_MAPPING:
            raise error
        return _without_video(PROCESSOR_MAPPING[type(config)]).from_pretrained(folder, local_files_only=True)


def _without_video(processor_class: type) -> type:
    class StillImageProcessor(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            # transformers 5's ProcessorMixin builds (from_pretrained) and expects (__init__) exactly these parts.
            return [name for name in super().get_attributes() if "video" not in name]

    StillImageProcessor.__name__ = StillImageProcessor.__qualname__ = f"{processor_class.__name__}WithoutVideo"
    return StillImageProcessor
