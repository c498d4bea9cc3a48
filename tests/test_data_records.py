"""Reading one JSONL object as a Record: every task format, task inference, placeholders, paths, and the
reasons a record is rejected."""

from pathlib import Path

import pytest

from unialignment.data.records import RecordError, TaskKind, infer_task, parse_record

BASE = Path("/data/set")


def t2i(prompt="a red square", image="img/1.png", **extra):
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<image>"}]
    return {"image": [image], "conversations": turns, **extra}


def edit(instruction="Make the sky red.", caption="a red sky", images=("src.png", "tgt.png"), **extra):
    turns = [{"from": "human", "value": caption}, {"from": "gpt", "value": ""}]
    return {"image": list(images), "conversations": turns, "instruction": instruction, **extra}


def vqa(question="<image>\nWhat colour is the square?", answer="Red.", image="x.png"):
    return {"image": [image], "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def parse(obj, task=None, image_root=None):
    return parse_record(obj, task, BASE, image_root, "train.jsonl:7")


def test_text_to_image():
    obj = t2i(dataset="ShareGPT4o-Image", img_w=[1024], img_h=[1024])
    record = parse(obj, TaskKind.TEXT_TO_IMAGE)
    assert record == parse(obj)  # inferred from the "<image>" answer
    assert record.task == TaskKind.TEXT_TO_IMAGE
    assert record.target_image == "/data/set/img/1.png" and record.source_images == ()
    assert record.prompt == record.caption == "a red square" and record.question == ""
    assert record.location == "train.jsonl:7"


@pytest.mark.parametrize("task", [TaskKind.EDIT, TaskKind.PERCEPTION])
def test_edit_and_perception(task):
    record = parse(edit(img_w=[1024, 1024]), task)
    assert record.task == task
    assert record.source_images == ("/data/set/src.png",) and record.target_image == "/data/set/tgt.png"
    assert record.prompt == "Make the sky red." and record.caption == "a red sky" and record.question == ""


def test_perception_looks_like_an_edit_when_inferred():
    assert parse(edit(instruction="Provide a depth map of the image.")).task == TaskKind.EDIT


def test_composition_in_our_style():
    record = parse(edit(instruction="Put the cat on the sofa.", images=("cat.png", "sofa.png", "out.png")))
    assert record.task == TaskKind.COMPOSITION
    assert record.source_images == ("/data/set/cat.png", "/data/set/sofa.png")
    assert record.target_image == "/data/set/out.png"
    assert (record.prompt, record.caption) == ("Put the cat on the sofa.", "a red sky")
    # one source is a composition too when the task is given
    assert parse(edit(), TaskKind.COMPOSITION).source_images == ("/data/set/src.png",)


@pytest.mark.parametrize("generated", [["out.png"], "out.png"])
def test_composition_in_the_authors_style(generated):
    obj = {"original_images": ["a.png", "b.png"], "generated_images": generated, "edit_prompt": "Merge them.",
           "caption": "a and b together"}  # fmt: skip
    record = parse(obj)
    assert record == parse(obj, TaskKind.COMPOSITION)
    assert record.task == TaskKind.COMPOSITION
    assert record.source_images == ("/data/set/a.png", "/data/set/b.png") and record.target_image == "/data/set/out.png"
    assert (record.prompt, record.caption, record.question) == ("Merge them.", "a and b together", "")


def test_understanding_and_plain_captions():
    record = parse(vqa())
    assert record.task == TaskKind.UNDERSTANDING
    assert record.target_image == "/data/set/x.png" and record.source_images == ()
    assert record.question == "What colour is the square?"
    assert record.caption == record.prompt == "Red."
    for question in ["", "<image>", " <image>\n"]:
        assert parse(vqa(question=question, answer="A red square.")).question == ""


def test_image_placeholders_and_whitespace_are_stripped():
    assert parse(t2i(prompt="<image>\n  a cat <image> ")).prompt == "a cat"
    record = parse(edit(instruction=" <image> Make it red.\n", caption="<image>a red car "))
    assert (record.prompt, record.caption) == ("Make it red.", "a red car")


def test_paths_resolve_against_image_root_else_the_file_folder():
    obj = edit(images=("/abs/src.png", "rel/tgt.png"))
    record = parse(obj)
    assert record.source_images == ("/abs/src.png",) and record.target_image == "/data/set/rel/tgt.png"
    record = parse(obj, image_root=Path("/images"))
    assert record.source_images == ("/abs/src.png",) and record.target_image == "/images/rel/tgt.png"


def test_unicode_text_is_kept():
    record = parse(t2i(prompt="Ein Café am Meer, 夕焼け 🌅"))
    assert record.caption == "Ein Café am Meer, 夕焼け 🌅"


def test_infer_task():
    assert infer_task(t2i()) == TaskKind.TEXT_TO_IMAGE
    assert infer_task(vqa()) == TaskKind.UNDERSTANDING
    assert infer_task(edit()) == TaskKind.EDIT
    assert infer_task(edit(images=("a", "b", "c"))) == TaskKind.COMPOSITION
    assert infer_task({"original_images": ["a"], "generated_images": "b"}) == TaskKind.COMPOSITION


def _without(obj, key):
    return {k: v for k, v in obj.items() if k != key}


def _with_turn(obj, position, turn):
    turns = list(obj["conversations"])
    turns[position] = turn
    return {**obj, "conversations": turns}


AUTHORS = {"original_images": ["a.png"], "generated_images": ["out.png"], "edit_prompt": "Merge.", "caption": "c"}


@pytest.mark.parametrize(
    ("obj", "task", "reason"),
    [
        (_without(edit(), "instruction"), TaskKind.EDIT, "field 'instruction' is missing"),
        (_without(t2i(), "conversations"), None, "field 'conversations' is missing"),
        ({**t2i(), "image": 3}, None, "field 'image' must be a list of strings, got int"),
        ({**t2i(), "image": "img/1.png"}, None, "field 'image' must be a list of strings, got str"),
        ({**edit(), "image": ["a.png", None]}, None, "field 'image' must be a list of strings, got null at [1]"),
        ({**t2i(), "image": [""]}, None, "field 'image' has an empty path at [0]"),
        ({**t2i(), "image": []}, None, "field 'image' is empty"),
        (edit(), TaskKind.TEXT_TO_IMAGE, "text-to-image needs exactly 1 image, got 2"),
        (t2i(), TaskKind.EDIT, "edit needs exactly 2 images (source, target), got 1"),
        (t2i(), TaskKind.COMPOSITION, "composition needs at least 2 images (sources, then the target), got 1"),
        (edit(images=("a", "b", "c")), TaskKind.UNDERSTANDING, "understanding needs exactly 1 image, got 3"),
        ({**edit(), "instruction": 5}, None, "field 'instruction' must be a string, got int"),
        (
            {**t2i(), "conversations": {"from": "human"}},
            None,
            "field 'conversations' must be a list of turns, got dict",
        ),
        (_with_turn(vqa(), 1, 42), None, "conversations[1] must be an object, got int"),
        (_with_turn(vqa(), 1, {"from": "gpt"}), TaskKind.UNDERSTANDING, "conversations[1].value is missing"),
        (_with_turn(vqa(), 1, {"from": "gpt", "value": 1}), None, "conversations[1].value must be a string, got int"),
        (
            {**t2i(), "conversations": t2i()["conversations"][:1]},
            TaskKind.UNDERSTANDING,
            "conversations needs turn [1] (the answer), got 1 turns",
        ),  # fmt: skip
        (t2i(prompt="<image> "), None, "conversations[0].value (the prompt) is empty"),
        (edit(instruction=""), None, "field 'instruction' is empty"),
        (edit(caption="  "), None, "conversations[0].value (the target caption) is empty"),
        (vqa(answer="<image>"), TaskKind.UNDERSTANDING, "conversations[1].value (the answer) is empty"),
        (vqa(answer=""), None, "cannot infer the task: 1 image, and conversations[1].value is neither '<image>'"),
        (_without(edit(), "instruction"), None, "cannot infer the task: 2 images but no field 'instruction'"),
        (
            {**AUTHORS, "generated_images": ["x", "y"]},
            None,
            "composition needs exactly 1 image in 'generated_images', got 2",
        ),  # fmt: skip
        ({**AUTHORS, "original_images": []}, None, "composition needs at least 1 source image in 'original_images'"),
        ({**AUTHORS, "edit_prompt": ["Merge."]}, None, "field 'edit_prompt' must be a string, got list"),
        (_without(AUTHORS, "caption"), TaskKind.COMPOSITION, "field 'caption' is missing"),
    ],
)
def test_record_errors_say_what_is_wrong(obj, task, reason):
    with pytest.raises(RecordError) as raised:
        parse(obj, task)
    assert str(raised.value).startswith(reason)
    assert isinstance(raised.value, ValueError)
