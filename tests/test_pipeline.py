"""UniAlignmentPipeline with tiny real components: outputs, seeding, guidance halves, input checks and loading."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from PIL import Image
from transformers import T5EncoderModel

from unialignment.frozen.text_encoder import FrozenT5, load_t5_tokenizer
from unialignment.models import UniAlignmentTransformer
from unialignment.pipelines import UniAlignmentPipeline, image_grid
from unialignment.pipelines.pipeline_unialignment import MASK_EMBEDDING_FILE
from unialignment.toy.components import make_tiny_components
from unialignment.toy.shapes import ShapeScene, draw_scene
from unialignment.toy.transformer import TINY_SD3_CONFIG, make_tiny_transformer

PROMPTS = ["a red circle on the left", "a blue square at the top"]
INSTRUCTIONS = ["make it green", "make it yellow"]
QUESTIONS = ["what shape is on the left", "what is at the top"]
HEIGHT, WIDTH = 32, 48  # not square, so that a swapped height and width shows
STEPS = 2
TEXT_LENGTH = 20  # room for the questions, which the tiny tokenizer splits into many pieces
# The keys of the authors' transformer/config.json (the released checkpoint's; docs/METHOD.md section 1).
AUTHORS_CONFIG_KEYS = (*TINY_SD3_CONFIG, "dual_attention_layers", "qk_norm", "vocab_size")


def _components(folders):
    tokenizer = load_t5_tokenizer(folders.tokenizer)
    text_encoder = T5EncoderModel.from_pretrained(folders.text_encoder)
    vae = AutoencoderKL.from_pretrained(folders.vae)
    sizes = dict(
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        joint_attention_dim=text_encoder.config.d_model,
        vocab_size=len(tokenizer),
    )
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
    ), sizes


@pytest.fixture(scope="module")
def component_folders(tmp_path_factory):
    return make_tiny_components(tmp_path_factory.mktemp("components"))


@pytest.fixture(scope="module")
def pipeline_folder(component_folders, tmp_path_factory):
    components, sizes = _components(component_folders)
    transformer = make_tiny_transformer(**sizes, teacher_dim=10)
    folder = tmp_path_factory.mktemp("pipeline")
    UniAlignmentPipeline(transformer=transformer, **components).save_pretrained(folder)
    return folder


def _load(folder, **kwargs):
    pipe = UniAlignmentPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(pipeline_folder):
    return _load(pipeline_folder)


@pytest.fixture(scope="module")
def sources():
    # 40 px squares: resized and centre-cropped to (HEIGHT, WIDTH) inside.
    return [draw_scene(ShapeScene("red", "circle", "left"), 40), draw_scene(ShapeScene("blue", "square", "top"), 40)]


def _generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _run(pipe, task, sources, indices=(0, 1), **kwargs):
    """Run one task on the inputs at `indices`, at the test size and step count."""
    kwargs = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, **kwargs}

    def pick(items):
        return [items[index] for index in indices]

    if task == "text_to_image":
        return pipe.text_to_image(pick(PROMPTS), **kwargs)
    if task == "edit":
        return pipe.edit(pick(sources), pick(INSTRUCTIONS), **kwargs)
    if task == "compose":  # (red, blue) and (blue, red)
        return pipe.compose(pick([sources, sources[::-1]]), pick(INSTRUCTIONS), **kwargs)
    if task == "caption":
        return pipe.caption(pick(sources), length=TEXT_LENGTH, **kwargs)
    return pipe.answer(pick(sources), pick(QUESTIONS), length=TEXT_LENGTH, **kwargs)


@contextmanager
def _recorded_calls(transformer):
    """The keyword arguments of every transformer call made inside the block."""
    calls = []
    handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def _forced_text_head(transformer, token_ids):
    """Make the text head certain of `token_ids[i]` at position i (the last id fills the rest)."""

    def force(module, args, kwargs, output):
        length = output.text_logits.shape[1]
        ids = (list(token_ids) + [token_ids[-1]] * length)[:length]
        forced = torch.full_like(output.text_logits, -100.0)
        forced[:, torch.arange(length), ids] = 100.0
        output.text_logits = forced
        return output

    handle = transformer.register_forward_hook(force, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# --- outputs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["text_to_image", "edit", "compose"])
@pytest.mark.parametrize("output_type", ["pil", "np", "latent"])
def test_image_tasks_return_the_requested_images(pipe, sources, task, output_type):
    images = _run(pipe, task, sources, num_images_per_prompt=2, output_type=output_type).images
    if output_type == "pil":
        assert len(images) == 4
        assert all(isinstance(image, Image.Image) and image.size == (WIDTH, HEIGHT) for image in images)
        assert all(image.mode == "RGB" for image in images)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (4, HEIGHT, WIDTH, 3)
        assert images.dtype == np.float32 and images.min() >= 0.0 and images.max() <= 1.0
    else:
        factor = pipe.vae_scale_factor
        assert isinstance(images, torch.Tensor)
        assert images.shape == (4, pipe.vae.config.latent_channels, HEIGHT // factor, WIDTH // factor)


def test_call_is_text_to_image(pipe):
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    called = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    named = pipe.text_to_image(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(called, named)


@pytest.mark.parametrize("task", ["caption", "answer"])
def test_text_tasks_return_clean_strings(pipe, sources, task):
    texts = _run(pipe, task, sources, generator=torch.Generator().manual_seed(0)).texts
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
    assert not any(token in text for text in texts for token in ("</s>", "<extra_id_0>", "<pad>"))


def test_caption_drops_every_eos_and_keeps_the_words_around_it(pipe, sources):
    circle = pipe.tokenizer("circle", add_special_tokens=False).input_ids[0]
    square = pipe.tokenizer("square", add_special_tokens=False).input_ids[0]
    eos = pipe.tokenizer.eos_token_id
    # positions: eos, circle, circle, eos, then square to the end
    with _forced_text_head(pipe.transformer, [eos, circle, circle, eos, square]):
        texts = _run(pipe, "caption", sources, num_inference_steps=3).texts
    assert texts == [pipe.tokenizer.decode([circle, circle] + [square] * (TEXT_LENGTH - 4))] * 2


def test_answers_leave_the_question_out(pipe, sources):
    circle = pipe.tokenizer("circle", add_special_tokens=False).input_ids[0]
    question_lengths = [len(pipe.tokenizer(question, add_special_tokens=False).input_ids) for question in QUESTIONS]
    # The text head forced onto one token: every answer position becomes it, the question positions stay and are cut.
    with _forced_text_head(pipe.transformer, [circle]):
        answers = _run(pipe, "answer", sources, num_inference_steps=3).texts
    assert answers == [pipe.tokenizer.decode([circle] * (TEXT_LENGTH - n)) for n in question_lengths]


# --- seeds and batches -------------------------------------------------------------------------------------------


def test_seeded_runs_reproduce(pipe, sources):
    first, again, other = (
        _run(pipe, "text_to_image", sources, generator=torch.Generator().manual_seed(seed), output_type="latent").images
        for seed in (0, 0, 1)
    )
    assert torch.equal(first, again) and not torch.equal(first, other)
    captions = [_run(pipe, "caption", sources, generator=torch.Generator().manual_seed(0)).texts for _ in range(2)]
    assert captions[0] == captions[1]


@pytest.mark.parametrize("task", ["text_to_image", "edit", "compose", "caption", "answer"])
def test_batched_equals_one_by_one_with_a_generator_per_output(pipe, sources, task):
    output_type = {} if task in ("caption", "answer") else {"output_type": "latent"}
    batched = _run(pipe, task, sources, generator=_generators(3, 4), **output_type)
    alone = [
        _run(pipe, task, sources, indices=(index,), generator=_generators(seed), **output_type)
        for index, seed in enumerate((3, 4))
    ]
    if task in ("caption", "answer"):
        assert batched.texts == [text for output in alone for text in output.texts]
    else:
        torch.testing.assert_close(batched.images, torch.cat([output.images for output in alone]))


def test_num_images_per_prompt_repeats_each_prompt_in_order(pipe, sources):
    with _recorded_calls(pipe.transformer) as calls:
        _run(pipe, "text_to_image", sources, num_images_per_prompt=3, generator=_generators(*range(6)))
    prompt_states = calls[0]["encoder_hidden_states"]  # [negative x 6; positive x 6]
    positive = prompt_states[6:]
    assert torch.equal(positive[0], positive[2]) and torch.equal(positive[3], positive[5])
    assert not torch.equal(positive[2], positive[3])


# --- guidance ------------------------------------------------------------------------------------------------------


def _null_prompt_embeds(pipe):
    """The training code's null prompt: the default negative prompt."""
    return FrozenT5(pipe.tokenizer, pipe.text_encoder, pipe.text_max_length).null_prompt_embeds()


def test_text_to_image_guides_with_the_null_prompt(pipe, sources):
    with _recorded_calls(pipe.transformer) as calls:
        _run(pipe, "text_to_image", sources)
    assert len(calls) == STEPS
    prompt_states = calls[0]["encoder_hidden_states"]
    assert prompt_states.shape[0] == 2 * len(PROMPTS)
    torch.testing.assert_close(prompt_states[: len(PROMPTS)], _null_prompt_embeds(pipe).expand(len(PROMPTS), -1, -1))
    assert calls[0]["condition_latents"] is None


def test_without_guidance_one_half_runs(pipe, sources):
    with _recorded_calls(pipe.transformer) as calls:
        _run(pipe, "edit", sources, guidance_scale=1.0)
    assert all(call["encoder_hidden_states"].shape[0] == 2 for call in calls)
    assert all(call["condition_latents"][0].shape[0] == 2 for call in calls)


@pytest.mark.parametrize("task", ["edit", "compose"])
def test_conditions_are_in_both_guidance_halves(pipe, sources, task):
    with _recorded_calls(pipe.transformer) as calls:
        _run(pipe, task, sources, negative_prompt="blurry")
    num_sources = 1 if task == "edit" else 2
    factor = pipe.vae_scale_factor
    for call in calls:
        conditions = call["condition_latents"]
        assert len(conditions) == num_sources
        for condition in conditions:
            assert condition.shape == (4, pipe.vae.config.latent_channels, HEIGHT // factor, WIDTH // factor)
            assert torch.equal(condition[:2], condition[2:]), "the unconditional half keeps the source images"
            assert not torch.equal(condition[0], condition[1])
        negative = FrozenT5(pipe.tokenizer, pipe.text_encoder, pipe.text_max_length).encode(["blurry"])
        torch.testing.assert_close(call["encoder_hidden_states"][:2], negative.expand(2, -1, -1))
    if task == "compose":
        # Composition 0 is (red, blue), composition 1 is (blue, red): the k conditions keep the sources' order.
        first, second = calls[0]["condition_latents"]
        torch.testing.assert_close(first[0], second[1])
        torch.testing.assert_close(first[1], second[0])


# --- input checks --------------------------------------------------------------------------------------------------

SIZE = {"height": HEIGHT, "width": WIDTH}
BAD_INPUTS = {
    "height not a multiple": (lambda pipe, s: pipe.text_to_image("a", height=30, width=WIDTH), "height .*8.* 30"),
    "zero width": (lambda pipe, s: pipe.text_to_image("a", height=HEIGHT, width=0), "width .*8.* 0"),
    "negative height": (lambda pipe, s: pipe.edit(s[0], "b", height=-16, width=WIDTH), "height .*-16"),
    "too large": (lambda pipe, s: pipe.caption(s[0], height=4096, width=WIDTH), "height 4096 is larger"),
    "caption size": (lambda pipe, s: pipe.caption(s[0], height=HEIGHT, width=20), "width .*8.* 20"),
    "empty prompt": (lambda pipe, s: pipe.text_to_image(""), r"prompt\[0\] is empty"),
    "blank prompt": (lambda pipe, s: pipe.text_to_image(["a", "  "]), r"prompt\[1\] is empty"),
    "no prompts": (lambda pipe, s: pipe.text_to_image([]), "prompt is an empty list"),
    "empty instruction": (lambda pipe, s: pipe.edit(s[0], ""), r"instruction\[0\] is empty"),
    "empty question": (lambda pipe, s: pipe.answer(s[0], ""), r"question\[0\] is empty"),
    "output type": (lambda pipe, s: pipe.text_to_image("a", output_type="pt", **SIZE), "output_type must be one of"),
    "negative prompts": (
        lambda pipe, s: pipe.text_to_image(["a", "b"], negative_prompt=["x"], **SIZE),
        "1 negative prompts",
    ),
    "images vs instructions": (lambda pipe, s: pipe.edit(s, ["b"]), "2 image.* 1 instruction"),
    "images vs questions": (lambda pipe, s: pipe.answer(s[0], ["a", "b"]), "1 image.* 2 question"),
    "compositions vs instructions": (lambda pipe, s: pipe.compose([s, s], "b"), "2 composition.* 1 instruction"),
    "different k": (
        lambda pipe, s: pipe.compose([s, s[:1]], ["a", "b"]),
        r"same number of source images, got \[1, 2\]",
    ),
    "generators": (
        lambda pipe, s: pipe.text_to_image(["a", "b"], generator=_generators(0), **SIZE),
        "1 generators for 2",
    ),
    "caption generators": (
        lambda pipe, s: pipe.caption(s, generator=_generators(0, 1, 2), **SIZE),
        "3 generators for 2",
    ),
    "steps": (lambda pipe, s: pipe.text_to_image("a", num_inference_steps=0, **SIZE), "num_inference_steps must be"),
    "images per prompt": (
        lambda pipe, s: pipe.text_to_image("a", num_images_per_prompt=0, **SIZE),
        "num_images_per_prompt",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_value_errors_naming_the_problem(pipe, sources, case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call(pipe, sources)


def test_mismatched_components_are_refused(component_folders):
    components, sizes = _components(component_folders)
    transformer = make_tiny_transformer(**{**sizes, "vocab_size": sizes["vocab_size"] + 1})
    with pytest.raises(ValueError, match="text head has"):
        UniAlignmentPipeline(transformer=transformer, **components)


# --- loading and saving --------------------------------------------------------------------------------------------


def _outputs(pipe, sources):
    image_kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    return (
        pipe.text_to_image(PROMPTS, generator=_generators(0, 1), **image_kwargs).images,
        pipe.edit(sources, INSTRUCTIONS, generator=_generators(0, 1), **image_kwargs).images,
        pipe.caption(sources, length=TEXT_LENGTH, height=HEIGHT, width=WIDTH, generator=_generators(0, 1)).texts,
    )


def test_save_and_load_round_trip(pipe, sources, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "UniAlignmentPipeline"
    reloaded = _load(tmp_path)
    for before, after in zip(_outputs(pipe, sources), _outputs(reloaded, sources), strict=True):
        assert torch.equal(before, after) if isinstance(before, torch.Tensor) else before == after


def _authors_folder(component_folders, folder):
    """A pipeline folder in the authors' released layout: their pipeline and transformer class names, only their
    transformer config keys (the other fields at their hard-coded values), and a learned mask embedding."""
    components, sizes = _components(component_folders)
    transformer = UniAlignmentTransformer(**{**TINY_SD3_CONFIG, **sizes, "num_layers": 8})  # align_depth 8
    UniAlignmentPipeline(transformer=transformer, **components).save_pretrained(folder)
    model_index = json.loads((folder / "model_index.json").read_text())
    model_index.update(
        _class_name="UniAlignmentPipelineAuthors",
        transformer=["unialignment_authors", "SD3JointModelFlexible"],
        tokenizer=["transformers", "T5TokenizerFast"],
    )
    (folder / "model_index.json").write_text(json.dumps(model_index))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    authors_config = {"_class_name": "SD3JointModelFlexible", "_diffusers_version": "0.31.0"}
    authors_config.update({key: config[key] for key in AUTHORS_CONFIG_KEYS})
    (folder / "transformer" / "config.json").write_text(json.dumps(authors_config))
    mask_embedding = torch.randn(components["text_encoder"].config.d_model)
    torch.save(mask_embedding, folder / MASK_EMBEDDING_FILE)
    return transformer, mask_embedding


def test_authors_layout_loads_with_its_mask_embedding(component_folders, sources, tmp_path):
    transformer, mask_embedding = _authors_folder(component_folders, tmp_path)
    pipe = _load(tmp_path)
    assert type(pipe.transformer) is UniAlignmentTransformer
    for name, tensor in transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], tensor), name
    mask_id = pipe.tokenizer.convert_tokens_to_ids("<extra_id_0>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[mask_id], mask_embedding)
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
    texts = pipe.caption(sources[0], length=TEXT_LENGTH, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH).texts
    assert len(texts) == 1

    kept = _load(tmp_path, mask_embedding=None)
    assert not torch.equal(kept.text_encoder.get_input_embeddings().weight[mask_id], mask_embedding)
    with pytest.raises(FileNotFoundError, match="no_such_file.pth"):
        _load(tmp_path, mask_embedding=tmp_path / "no_such_file.pth")


def test_bfloat16_loading_runs_on_cpu(pipeline_folder, sources):
    pipe = _load(pipeline_folder, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16
    images = _run(pipe, "text_to_image", sources, output_type="np").images
    assert images.shape == (2, HEIGHT, WIDTH, 3) and np.isfinite(images).all()
    assert len(_run(pipe, "caption", sources).texts) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload_matches_the_device(pipeline_folder, sources):
    on_device = _load(pipeline_folder).to("cuda")
    offloaded = _load(pipeline_folder)
    offloaded.enable_model_cpu_offload()
    for task in ("text_to_image", "edit", "compose"):
        expected = _run(on_device, task, sources, generator=_generators(0, 1), output_type="latent").images
        actual = _run(offloaded, task, sources, generator=_generators(0, 1), output_type="latent").images
        torch.testing.assert_close(actual, expected)
    for task in ("caption", "answer"):
        generator = torch.Generator("cuda").manual_seed(0)
        assert len(_run(offloaded, task, sources, generator=generator).texts) == 2
    assert offloaded.transformer.device.type == "cpu", "the models go back to the CPU after each call"


def test_image_grid_layout(sources):
    grid = image_grid(sources * 3, columns=4)
    assert grid.size == (4 * 40, 2 * 40)
