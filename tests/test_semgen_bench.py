"""SemGen-Bench end to end on a tiny pipeline and a tiny Qwen2.5-VL judge: outputs, resume, shards, judging with
retries and failures, the reading of answers and the report's arithmetic."""

import csv
import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from PIL import Image
from transformers import T5EncoderModel

from unialignment.evaluation.semgen_bench import (
    TASKS,
    BenchError,
    GenerationSettings,
    generate,
    output_path,
    read_bench,
    sample_seed,
    shard,
    shard_from_environment,
)
from unialignment.evaluation.semgen_judge import Scores, parse_scores
from unialignment.evaluation.semgen_scores import (
    ScoreRow,
    TaskSummary,
    format_report,
    read_scores,
    score,
    summarize,
    write_scores,
)
from unialignment.evaluation.vlm_judge import VLMJudge
from unialignment.frozen.text_encoder import load_t5_tokenizer
from unialignment.pipelines import UniAlignmentPipeline
from unialignment.toy.components import make_tiny_components
from unialignment.toy.shapes import ShapeScene, draw_scene
from unialignment.toy.teacher import make_tiny_teacher
from unialignment.toy.transformer import make_tiny_transformer

REPO = Path(__file__).resolve().parents[1]
REAL_BENCH = REPO.parent / "shared" / "data" / "semgen_bench"
# Tiny outputs, and guidance 1 (no unconditional half) for half the compute: the pipeline's tests cover guidance.
FAST = ["--size", "32", "--steps", "2", "--guidance", "1"]
KEYS = ["3", "11", "7"]  # file order, which is not sorted order
SCENES = [
    ShapeScene("red", "square", "left"),
    ShapeScene("blue", "circle", "middle"),
    ShapeScene("green", "circle", "top"),
]
# The tiny judge's template: Qwen's chat markup, with an image part as Qwen2.5-VL's own template writes it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% for part in message.content %}{% if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _line(key: str, scene: ShapeScene) -> dict:
    """A line with the fields of the real semgen_bench.jsonl."""
    return {
        "image_id": int(key),
        "image_path": f"/authors/machine/benchmark/images/{key}.jpg",
        "t2i_long": f"{scene.caption.capitalize()}, on a plain background, drawn with clean edges and soft light.",
        "t2i_complex": f"One {scene.colour} {scene.shape} and nothing else.",
        "edit_multi": "Make the shape yellow.Add a thin black outline.",
        "edit_complex": "Remove the shape.",
    }


def _write_bench(folder: Path, lines: list) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (folder / "semgen_bench.jsonl").write_text(text)
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    lines = [_line(key, scene) for key, scene in zip(KEYS, SCENES, strict=True)]
    folder = _write_bench(tmp_path_factory.mktemp("semgen"), lines)
    for key, scene in zip(KEYS, SCENES, strict=True):
        draw_scene(scene, 40).save(folder / "images" / f"{key}.jpg")
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    folders = make_tiny_components(root / "components")
    tokenizer = load_t5_tokenizer(folders.tokenizer)
    transformer = make_tiny_transformer(
        in_channels=4, out_channels=4, joint_attention_dim=32, vocab_size=len(tokenizer), teacher_dim=32
    )
    pipe = UniAlignmentPipeline(
        transformer,
        FlowMatchEulerDiscreteScheduler(),
        AutoencoderKL.from_pretrained(folders.vae),
        T5EncoderModel.from_pretrained(folders.text_encoder),
        tokenizer,
    )
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    """The tiny Qwen2.5-VL checkpoint, made a chat model by a chat template."""
    folder = make_tiny_teacher(tmp_path_factory.mktemp("judge") / "tiny-qwen2.5-vl")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def semgen():
    return runpy.run_path(str(REPO / "scripts" / "semgen_bench.py"), run_name="semgen_bench")["main"]


@pytest.fixture(scope="module")
def generated(semgen, pipeline_folder, bench, tmp_path_factory):
    """One full run of `generate` (batches of 2): the results folder."""
    out = tmp_path_factory.mktemp("results")
    arguments = ["--model", pipeline_folder, "--bench", bench, "--out", out, "--method", "tiny", "--batch-size", "2"]
    assert semgen(["generate", *map(str, arguments), *FAST]) == 0
    return out


def _fullset(out: Path, method: str = "tiny") -> Path:
    return out / method / "fullset"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- the benchmark file -------------------------------------------------------------------------------------------


def test_read_bench_takes_every_task_of_every_line(bench):
    samples = read_bench(bench)
    assert [(sample.task, sample.key) for sample in samples] == [(task, key) for task in TASKS for key in KEYS]
    by_name = {(sample.task, sample.key): sample for sample in samples}
    line = _line("11", SCENES[1])
    for task in TASKS:
        assert by_name[(task, "11")].text == line[task]
    assert by_name[("edit_multi", "11")].source == bench / "images" / "11.jpg"  # not the authors' image_path
    assert by_name[("t2i_long", "11")].source is None
    assert by_name[("edit_complex", "7")].where == f"{bench / 'semgen_bench.jsonl'}:3"


def test_the_real_benchmark_has_600_samples():
    if not (REAL_BENCH / "semgen_bench.jsonl").is_file():
        pytest.skip("../shared/data/semgen_bench is not beside the checkout")
    samples = read_bench(REAL_BENCH)
    assert len(samples) == 600
    assert {task: sum(sample.task == task for sample in samples) for task in TASKS} == dict.fromkeys(TASKS, 150)


def test_bad_lines_are_all_reported_with_file_and_line(tmp_path):
    good = _line("1", SCENES[0])
    folder = _write_bench(
        tmp_path, [good, "not json", {**_line("2", SCENES[0]), "t2i_long": ""}, good, _line("5", SCENES[0])]
    )
    draw_scene(SCENES[0]).save(folder / "images" / "1.jpg")
    path = folder / "semgen_bench.jsonl"
    with pytest.raises(BenchError) as error:
        read_bench(folder)
    message = str(error.value)
    assert message.startswith("4 bad line(s)")
    assert f"{path}:2: not JSON" in message
    assert f"{path}:3: t2i_long must be a non-empty string, got ''" in message
    assert f"{path}:4: image_id 1 again (first at line 1)" in message
    assert f"{path}:5: image not found: {folder / 'images' / '5.jpg'}" in message
    assert f"{path}:1" not in message


def test_shards_partition_the_samples(bench):
    samples = read_bench(bench)
    for count in (1, 2, 5, 20):
        shards = [shard(samples, index, count) for index in range(count)]
        assert sorted(sum(shards, []), key=samples.index) == samples
        assert sum(len(part) for part in shards) == len(samples)  # disjoint
        assert shards == [shard(samples, index, count) for index in range(count)]  # deterministic
    assert shard_from_environment({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == (3, 8)
    assert shard_from_environment({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert shard_from_environment({}) == (0, 1)
    with pytest.raises(ValueError):
        shard(samples, 2, 2)


# --- generation ---------------------------------------------------------------------------------------------------


def test_generate_writes_every_output_once(generated, bench):
    fullset = _fullset(generated)
    files = sorted(path.relative_to(fullset).as_posix() for path in fullset.rglob("*") if path.is_file())
    assert files == sorted(f"{task}/{key}.png" for task in TASKS for key in KEYS)
    for path in fullset.rglob("*.png"):
        with Image.open(path) as image:
            assert (image.format, image.size, image.mode) == ("PNG", (32, 32), "RGB")
    settings = json.loads((generated / "tiny" / "generation.json").read_text())
    assert settings == dict(size=32, steps=2, t2i_guidance=1.0, edit_guidance=1.0, seed=0)


def test_generate_resumes_without_redoing_finished_outputs(semgen, generated, pipeline_folder, bench):
    fullset = _fullset(generated)
    before = {path: path.stat().st_mtime_ns for path in fullset.rglob("*.png")}
    redo = fullset / "edit_multi" / "11.png"
    kept = _pixels(redo)
    redo.unlink()
    (redo.parent / ".11.png.999.tmp").write_bytes(b"half a file from a killed run")

    arguments = ["--model", pipeline_folder, "--bench", bench, "--out", generated, "--method", "tiny"]
    assert semgen(["generate", *map(str, arguments), *FAST]) == 0
    after = {path: path.stat().st_mtime_ns for path in fullset.rglob("*.png")}
    assert after.keys() == before.keys()
    assert {path for path in after if after[path] != before[path]} == {redo}
    # Seeded by its key: made alone now, it is what it was in a batch of two (up to rounding).
    assert np.abs(_pixels(redo) - kept).max() <= 1

    pipe = UniAlignmentPipeline.from_pretrained(pipeline_folder)
    assert (
        generate(
            pipe,
            read_bench(bench),
            fullset,
            GenerationSettings(size=32, steps=2, t2i_guidance=1.0, edit_guidance=1.0),
            progress=False,
        )
        == 0
    )


def test_generate_refuses_to_mix_settings(semgen, generated, pipeline_folder, bench, capsys):
    arguments = ["--model", pipeline_folder, "--bench", bench, "--out", generated, "--method", "tiny"]
    assert semgen(["generate", *map(str, arguments), "--size", "32", "--steps", "3"]) == 2
    assert "give another --method or --out" in capsys.readouterr().err


def test_a_shard_makes_its_slice_as_the_full_run_made_it(semgen, generated, pipeline_folder, bench):
    samples = read_bench(bench)
    out = generated / "sharded"
    arguments = ["--model", pipeline_folder, "--bench", bench, "--out", out, "--method", "tiny", "--batch-size", "1"]
    assert semgen(["generate", *map(str, arguments), *FAST, "--shard", "1", "--num-shards", "3"]) == 0
    mine = shard(samples, 1, 3)
    assert set(_fullset(out).rglob("*.png")) == {output_path(_fullset(out), sample) for sample in mine}
    assert {sample.task for sample in mine} == set(TASKS)  # interleaved: every task in every shard
    for sample in mine:  # seeded by key: alone in a shard, as it was in a batch of two of the full run
        full_run = _pixels(output_path(_fullset(generated), sample))
        assert np.abs(_pixels(output_path(_fullset(out), sample)) - full_run).max() <= 1


def test_sample_seeds_are_distinct_and_depend_only_on_task_and_key(bench):
    samples = read_bench(bench)
    seeds = [sample_seed(sample) for sample in samples]
    assert len(set(seeds)) == len(samples)
    assert seeds == [sample_seed(sample) for sample in read_bench(bench)]
    assert sample_seed(samples[0], base_seed=5) == seeds[0] + 5


# --- judging ------------------------------------------------------------------------------------------------------


def test_a_tiny_judge_answers_are_retried_then_recorded_as_failures(
    semgen, generated, judge_folder, bench, monkeypatch, capsys
):
    judge = VLMJudge.from_pretrained(judge_folder, device="cpu", max_new_tokens=8)
    calls = []
    real_ask = judge.ask

    def counted_ask(images, question, seed=None):
        calls.append((len(images), seed))
        return real_ask(images, question, seed)

    monkeypatch.setattr(judge, "ask", counted_ask)
    samples = read_bench(bench)
    scores_file = generated / "tiny" / "semgen_scores.csv"
    first = samples[:2] + samples[-2:]  # two text-to-image and two edits
    counts = score(judge, first, _fullset(generated), scores_file, retries=1, progress=False)
    assert counts == dict(scored=0, failed=4, skipped=0, missing=0)
    # Random weights say nothing readable: each output is asked twice, greedy then sampled; edits show two images.
    assert [count for count, _ in calls] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [seed is None for _, seed in calls] == [True, False] * 4

    # The command line scores the rest and skips the four already there.
    arguments = ["--judge", judge_folder, "--bench", bench, "--out", generated, "--method", "tiny"]
    assert semgen(["score", *map(str, arguments), "--retries", "0", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert "scored 0, failed 8, already scored 4, without an output 0" in capsys.readouterr().err
    with open(scores_file, newline="") as file:
        rows = list(csv.DictReader(file))
    in_order = [(task, key) for task in TASKS for key in sorted(KEYS, key=int)]
    assert [(row["task"], row["key"]) for row in rows] == in_order
    for row in rows:
        attempts = "2" if (row["task"], row["key"]) in {(sample.task, sample.key) for sample in first} else "1"
        assert (row["sc"], row["pq"], row["overall"], row["status"], row["attempts"]) == (
            "",
            "",
            "",
            "failed",
            attempts,
        )
        assert "\n" not in row["answer"]  # escaped: one row, one line

    calls.clear()
    assert score(judge, samples, _fullset(generated), scores_file, retries=1, progress=False)["skipped"] == 12
    assert calls == []
    arguments[1] = generated / "no-such-judge"  # with nothing to score, the judge is not even loaded
    assert semgen(["score", *map(str, arguments)]) == 0
    assert "nothing to score" in capsys.readouterr().err
    summary = summarize(read_scores(scores_file).values())
    no_means = TaskSummary(None, None, None, scored=0, failed=3)  # failures are not zeros
    assert all(summary[task] == no_means for task in TASKS)
    assert semgen(["report", "--out", str(generated), "--method", "tiny"]) == 0
    assert "| t2i_long | n/a | n/a | n/a | 0 | 3 |" in capsys.readouterr().out


class ScriptedJudge:
    """Answers from a list, in order, recording the seeds it was asked with."""

    def __init__(self, answers):
        self.answers, self.seeds = list(answers), []

    def ask(self, images, question, seed=None):
        self.seeds.append(seed)
        return self.answers.pop(0)


def test_an_unreadable_answer_is_asked_again(generated, bench, tmp_path):
    sample, other = read_bench(bench)[:2]
    answer = '```json\n{"semantic_consistency": [4, 7], "pq": [9, 9]}\n```'
    judge = ScriptedJudge(["I cannot rate this.", answer])
    scores_file = tmp_path / "scores.csv"
    counts = score(judge, [sample], _fullset(generated), scores_file, retries=2, progress=False)
    assert counts == dict(scored=1, failed=0, skipped=0, missing=0)
    assert judge.seeds[0] is None and judge.seeds[1] is not None
    row = read_scores(scores_file)[(sample.task, sample.key)]
    assert (row.sc, row.pq, row.overall, row.status, row.attempts) == (4.0, 9.0, 6.0, "ok", 2)
    assert row.answer == answer.replace("\n", "\\n")
    # Scoring another output rewrites the file and leaves this row as it was.
    score(ScriptedJudge(["SC 1 PQ 1"]), [other], _fullset(generated), scores_file, progress=False)
    assert read_scores(scores_file)[(sample.task, sample.key)] == row

    # A failed row stays failed on a rerun, unless asked to retry failures.
    write_scores(scores_file, [ScoreRow(sample.task, sample.key, None, None, "failed", 3, "?")])
    assert score(ScriptedJudge([]), [sample], _fullset(generated), scores_file, progress=False)["skipped"] == 1
    judge = ScriptedJudge(["SC: 5, 6\nPQ: 8/10, 7/10"])
    score(judge, [sample], _fullset(generated), scores_file, retry_failed=True, progress=False)
    assert read_scores(scores_file)[(sample.task, sample.key)].sc == 5.0


def test_outputs_not_made_yet_are_counted_as_missing(bench, tmp_path):
    counts = score(ScriptedJudge([]), read_bench(bench), tmp_path / "fullset", tmp_path / "s.csv", progress=False)
    assert counts == dict(scored=0, failed=0, skipped=0, missing=12)
    assert not (tmp_path / "s.csv").exists()


# --- reading answers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('{"reason": "fine", "semantic_consistency": [7, 5], "perceptual_quality": [8, 6]}', (5, 6)),
        ('Here you go:\n```json\n{"SC": [9, 3], "PQ": [4, 10]}\n```\nHope it helps.', (3, 4)),
        ('{"Semantic Consistency": {"instruction": 3, "preservation": "9/10"}, "pq": 7.5}', (3, 7.5)),
        ('{"elements": 8, "composition": 6, "naturalness": 9, "artifacts": 2}', (6, 2)),
        ("[[6, 8], [7, 7]]", (6, 7)),
        ("{'semantic_consistency': [7, 5], 'perceptual_quality': [8, 6]}", (5, 6)),  # Python, not JSON: read as text
        ("Semantic consistency: 7/10 and 5 out of 10\nPerceptual quality: 8, 6 since 2 hands look odd", (5, 6)),
        ("The semantic consistency suffers: 2 of the 3 cats are missing.\nSC: [4, 6]\nPQ: [8, 7]", (4, 7)),
        ("Semantic consistency:\n1. elements: 7\n2. composition: 5\n\nPerceptual quality:\n1. x: 8\n2. y: 9", (5, 8)),
        ('{"semantic_consistency": [7, 10], "perceptual_quality": [0, 6]}', (7, 0)),  # the ends of the range
    ],
)
def test_parse_scores_reads(answer, expected):
    assert parse_scores(answer) == Scores(*map(float, expected))


@pytest.mark.parametrize(
    "answer",
    [
        '{"semantic_consistency": [7, 12], "perceptual_quality": [8, 6]}',  # out of range: not clamped to 10
        '{"sc": -1, "pq": 5}',
        "SC: 75%  PQ: 80%",
        '{"reason": "the cat is there", "semantic_consistency": [7, 5], "perceptual_quality": [8,',  # cut off
        '{"semantic_consistency": [7, 5]}',  # one group only
        '{"semantic_consistency": [], "perceptual_quality": [8]}',
        '{"semantic_consistency": true, "perceptual_quality": [8]}',
        "ang,an\x14\ufffd\nang,an the",
        "",
    ],
)
def test_parse_scores_refuses(answer):
    assert parse_scores(answer) is None


# --- the report ---------------------------------------------------------------------------------------------------


def test_report_averages_per_sample_overall_per_task_then_over_tasks(semgen, tmp_path, capsys):
    def ok(task, key, sc, pq):
        return ScoreRow(task, key, sc, pq, "ok", 1, "")

    rows = [
        ok("t2i_long", "1", 4, 9),  # overall 6
        ok("t2i_long", "2", 9, 4),  # overall 6: the task's overall is 6, not sqrt(6.5 * 6.5)
        ok("t2i_complex", "1", 1, 4),  # overall 2
        ScoreRow("t2i_complex", "2", None, None, "failed", 3, "no numbers"),  # left out, counted
        ok("edit_multi", "1", 10, 10),  # overall 10
        ok("edit_multi", "2", 0, 5),  # overall 0
        ok("edit_complex", "1", 2.5, 10),  # overall 5
    ]
    scores_file = tmp_path / "scores.csv"
    write_scores(scores_file, rows)
    assert semgen(["report", "--scores", str(scores_file)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "| t2i_long | 6.50 | 6.50 | 6.00 | 2 | 0 |" in table
    assert "| t2i_complex | 1.00 | 4.00 | 2.00 | 1 | 1 |" in table
    assert "| edit_multi | 5.00 | 7.50 | 5.00 | 2 | 0 |" in table
    assert "| edit_complex | 2.50 | 10.00 | 5.00 | 1 | 0 |" in table
    # (6.5 + 1 + 5 + 2.5) / 4, (6.5 + 4 + 7.5 + 10) / 4, (6 + 2 + 5 + 5) / 4
    assert "| **average** | 3.75 | 7.00 | 4.50 | 6 | 1 |" in table
    average = summarize(read_scores(scores_file).values())["average"]
    assert (average.sc, average.pq, average.overall) == (3.75, 7.0, 4.5)
    assert math.isclose(read_scores(scores_file)[("t2i_long", "1")].overall, 6.0)

    # A task without a scored sample has no mean, and then neither has the average.
    summary = summarize(rows[:2])
    assert summary["edit_multi"].overall is None and summary["average"].overall is None
    assert "| **average** | n/a | n/a | n/a | 2 | 0 |" in format_report(summary)


def test_a_bad_scores_row_names_file_and_line(semgen, tmp_path, capsys):
    scores_file = tmp_path / "scores.csv"
    write_scores(scores_file, [ScoreRow("t2i_long", "1", 4, 9, "ok", 1, "")])
    with open(scores_file, "a") as file:
        file.write("t2i_long,2,seven,9,,ok,1,\n")
    assert semgen(["report", "--scores", str(scores_file)]) == 2
    assert f"error: {scores_file}:3: could not convert string to float: 'seven'" in capsys.readouterr().err


def test_command_line_mistakes_are_one_line(semgen, tmp_path, capsys):
    folder = _write_bench(tmp_path / "bench", ["{}"])
    arguments = ["--model", tmp_path, "--bench", folder, "--out", tmp_path / "out", "--method", "m"]
    assert semgen(["generate", *map(str, arguments)]) == 2
    assert f"{folder / 'semgen_bench.jsonl'}:1: image_id must be" in capsys.readouterr().err
    assert semgen(["report", "--out", str(tmp_path), "--method", "m"]) == 2
    assert "run `score` first" in capsys.readouterr().err
    assert semgen(["generate", *map(str, arguments[:-1]), "../m"]) == 2
    assert "cannot name a folder" in capsys.readouterr().err
