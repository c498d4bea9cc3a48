"""The JSONL index: byte offsets read back the right records, bad lines are reported with their 1-based line
numbers, the cache is reused until the file or the settings change, and the index survives pickling."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from unialignment.data import jsonl_index
from unialignment.data.jsonl_index import JsonlIndex, check_bad_fraction, write_skip_report
from unialignment.data.records import TaskKind


def t2i_line(prompt, image="img/a.png", **extra):
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<image>"}]
    return json.dumps({"image": [image], "conversations": turns, **extra}, ensure_ascii=False)


def edit_line(instruction, caption="the target", images=("img/a.png", "img/b.png"), **extra):
    turns = [{"from": "human", "value": caption}, {"from": "gpt", "value": ""}]
    return json.dumps({"image": list(images), "conversations": turns, "instruction": instruction, **extra})


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ["a", "b"]:
        Image.new("RGB", (2, 2)).save(tmp_path / "img" / f"{name}.png")
    return tmp_path


def write_jsonl(path, lines, newline=b"\n"):
    path.write_bytes(b"".join((line.encode() if isinstance(line, str) else line) + newline for line in lines))
    return path


def build(path, **kwargs):
    return JsonlIndex.build_or_load(path, kwargs.pop("task", None), progress=False, **kwargs)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_offsets_read_back_the_right_records(data_dir, newline):
    lines = [t2i_line("a cat"), edit_line("Make it red."), t2i_line("ein Café, 夕焼け 🌅"), t2i_line("last")]
    path = write_jsonl(data_dir / "train.jsonl", lines, newline)
    index = build(path)
    assert len(index) == 4 and index.num_skipped == 0
    assert index.line_numbers.tolist() == [1, 2, 3, 4]
    assert index.tasks.tolist() == [
        TaskKind.TEXT_TO_IMAGE,
        TaskKind.EDIT,
        TaskKind.TEXT_TO_IMAGE,
        TaskKind.TEXT_TO_IMAGE,
    ]
    assert index.offsets.dtype == np.int64 and index.line_numbers.dtype == np.int32 and index.tasks.dtype == np.uint8
    assert [index.read_record(i).prompt for i in range(4)] == ["a cat", "Make it red.", "ein Café, 夕焼け 🌅", "last"]
    record = index.read_record(1)
    assert record.source_images == (str(data_dir / "img/a.png"),) and record.target_image == str(data_dir / "img/b.png")
    assert record.location == index.location(1) == f"{path}:2"


def test_target_sizes_come_from_img_w_and_img_h(data_dir):
    lines = [
        t2i_line("a", img_w=[512], img_h=[256]),
        edit_line("b", img_w=[1024, 640], img_h=[1024, 480]),
        t2i_line("c"),
    ]
    index = build(write_jsonl(data_dir / "train.jsonl", lines))
    assert index.widths.tolist() == [512, 640, -1] and index.heights.tolist() == [256, 480, -1]
    assert index.widths.dtype == index.heights.dtype == np.int32


def test_bad_lines_are_reported_with_their_line_numbers(data_dir):
    lines = [
        t2i_line("good"),
        "",
        "   \t",
        '{"image": ["img/a.png"], "conversations": [',
        "[1, 2]",
        json.dumps({"image": 3, "conversations": []}),
        t2i_line("no such image", image="img/missing.png"),
        b'{"caption": "\xff\xfe"}',
        edit_line("x", images=("img/a.png",)),
        t2i_line("also good"),
    ]
    path = write_jsonl(data_dir / "train.jsonl", lines)
    index = build(path)
    assert index.line_numbers.tolist() == [1, 10]
    reasons = dict(index.skipped)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert reasons[2] == reasons[3] == "empty line"
    assert reasons[4] == "malformed JSON: Expecting value at column 44"
    assert reasons[5] == "expected a JSON object, got list"
    assert reasons[6] == "field 'image' must be a list of strings, got int"
    assert reasons[7] == f"image file not found: {data_dir / 'img/missing.png'}"
    assert reasons[8].startswith("invalid UTF-8: 'utf-8' codec can't decode byte 0xff")
    assert reasons[9].startswith("cannot infer the task: 1 image")  # an edit without its source
    assert index.num_skipped == 8 and index.num_bad == 6
    assert index.skip_report()[2] == f"{path}:4: {reasons[4]}"
    # without the image check the missing file is fine; with a task given, other tasks are bad lines
    assert 7 not in dict(build(path, check_images=False).skipped)
    assert build(path, task=TaskKind.EDIT).line_numbers.tolist() == []


def test_empty_file(data_dir):
    index = build(write_jsonl(data_dir / "empty.jsonl", []))
    assert len(index) == 0 and index.num_skipped == 0


def test_cache_is_reused_until_the_file_or_the_settings_change(data_dir, monkeypatch):
    path = write_jsonl(data_dir / "train.jsonl", [t2i_line("a"), "oops"])
    first = build(path)
    assert (data_dir / ".train.jsonl.index.npz").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("the index was built again")

    with monkeypatch.context() as patch:
        patch.setattr(JsonlIndex, "_build", fail)
        cached = build(path)
    assert cached.offsets.tolist() == first.offsets.tolist() and cached.skipped == first.skipped
    assert cached.read_record(0).prompt == "a"

    builds = []
    build_for_real = JsonlIndex._build.__func__
    monkeypatch.setattr(JsonlIndex, "_build", classmethod(lambda cls, *a: builds.append(1) or build_for_real(cls, *a)))
    build(path, check_images=False)  # other settings
    assert len(builds) == 1
    with open(path, "a") as f:
        f.write(t2i_line("b") + "\n")
    assert len(build(path)) == 2 and len(builds) == 2  # the file changed
    os.utime(path, ns=(0, 0))
    build(path)
    assert len(builds) == 3  # same size, other mtime
    (data_dir / ".train.jsonl.index.npz").write_bytes(b"not a zip file")
    assert len(build(path)) == 2 and len(builds) == 4  # unreadable cache


def test_cache_dir_and_an_unwritable_data_folder(data_dir, tmp_path_factory, monkeypatch):
    path = write_jsonl(data_dir / "train.jsonl", [t2i_line("a")])
    cache_dir = tmp_path_factory.mktemp("cache")
    build(path, cache_dir=cache_dir)
    assert [p.name.split(".")[:2] for p in cache_dir.iterdir()] == [["train", "jsonl"]]
    assert not (data_dir / ".train.jsonl.index.npz").exists()

    home_cache = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home_cache))
    monkeypatch.setattr(jsonl_index.os, "access", lambda *args: False)
    build(path)
    assert len(list((home_cache / "unialignment" / "jsonl_index").iterdir())) == 1


def test_read_record_refuses_a_file_changed_after_indexing(data_dir):
    path = write_jsonl(data_dir / "train.jsonl", [t2i_line("a")])
    index = build(path)
    write_jsonl(path, [t2i_line("a much longer prompt")])
    with pytest.raises(RuntimeError, match="changed after it was indexed"):
        index.read_record(0)


def test_index_pickles_and_reopens_its_file_in_a_new_process(data_dir, monkeypatch):
    path = write_jsonl(data_dir / "train.jsonl", [t2i_line("a"), t2i_line("b")])
    index = build(path)
    assert index.read_record(0).prompt == "a"  # the file is open now
    restored = pickle.loads(pickle.dumps(index))
    assert restored.read_record(1).prompt == "b" and restored.location(1) == f"{path}:2"
    handle = index._handle()
    monkeypatch.setattr(jsonl_index.os, "getpid", lambda: -1)  # as if forked into a DataLoader worker
    assert index._handle() is not handle and index.read_record(1).prompt == "b"


def test_check_bad_fraction_names_the_bad_files(data_dir):
    clean = build(write_jsonl(data_dir / "clean.jsonl", [t2i_line("a"), "", t2i_line("b")]))
    noisy = build(write_jsonl(data_dir / "noisy.jsonl", [t2i_line("a"), "{", t2i_line("b"), t2i_line("c")]))
    check_bad_fraction([clean, noisy], max_bad_fraction=0.25)  # empty lines are not bad
    with pytest.raises(ValueError) as raised:
        check_bad_fraction([clean, noisy], max_bad_fraction=0.1)
    message = str(raised.value)
    assert "noisy.jsonl: 1 bad of 4 lines" in message and f"{noisy.path}:2: malformed JSON" in message
    assert "clean.jsonl" not in message

    report = data_dir / "skipped.txt"
    write_skip_report([clean, noisy], report)
    assert report.read_text().splitlines() == [f"{clean.path}:2: empty line", noisy.skip_report()[0]]


def test_two_processes_build_the_same_index_as_one(data_dir, tmp_path_factory):
    lines = []
    for i in range(600):
        lines += [t2i_line(f"prompt {i}", img_w=[i + 1], img_h=[2 * i + 1]), edit_line(f"edit {i}")]
        if i % 50 == 0:
            lines += ["", "{broken", t2i_line("gone", image="img/none.png")]
    path = write_jsonl(data_dir / "train.jsonl", lines)
    one = build(path, num_workers=1, cache_dir=tmp_path_factory.mktemp("one"))
    two = build(path, num_workers=2, cache_dir=tmp_path_factory.mktemp("two"))
    assert len(one) == 1200 and one.num_skipped == 36
    for name in ["offsets", "line_numbers", "tasks", "widths", "heights"]:
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    assert one.skipped == two.skipped
    assert two.read_record(1199).prompt == "edit 599"
