"""The shapes world, its checker and held-out scoring, the dataset-folder reader and the tiny components fitted
to a dataset folder: the pieces of the built-in demo, tested without training."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from transformers import AutoTokenizer, T5EncoderModel

from unialignment.data.records import TaskKind
from unialignment.frozen.teacher import QwenVLTeacher
from unialignment.frozen.text_encoder import load_t5_tokenizer, mask_token_id
from unialignment.toy.checker import colours_in, find_objects, mask_iou, positions_in, shapes_in
from unialignment.toy.components import dataset_text_length, make_dataset_components
from unialignment.toy.folder import DatasetFolderError, read_split, split_files
from unialignment.toy.heldout import (
    checks_world,
    format_seed_table,
    format_table,
    objects_in,
    plan_jobs,
    score_outputs,
)
from unialignment.toy.t5 import make_tiny_t5, pretrain_tiny_t5
from unialignment.toy.teacher import Retrieval, make_tiny_teacher, pretrain_tiny_teacher, score_retrieval
from unialignment.toy.vae import TINY_VAE_CONFIG, images_to_tensor, reconstruction_psnr, train_vae
from unialignment.toy.world import (
    Scene,
    ShapeObject,
    all_objects,
    draw_edges,
    draw_mask,
    draw_scene,
    heldout_triples,
)

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    runpy.run_path(str(SCRIPTS / "make_toy_world.py"))["make_toy_world"](root, side=64, seed=0)
    return root


def _triples_in_file_name(path: str) -> set[tuple[str, str, str]]:
    """make_toy_world names images `<size>_<colour>_<shape>_<position>[__...]__<seed>.png`."""
    parts = Path(path).stem.split("__")[:-1]
    return {tuple(part.split("_")[1:]) for part in parts}


def test_world_splits_keep_heldout_combinations_out_of_training(world):
    held = heldout_triples()
    assert len(held) == 12
    train, heldout = read_split(world, "train"), read_split(world, "heldout")
    assert set(train) == set(heldout) == {"t2i", "edit", "perception", "composition", "vqa"}
    for records in train.values():
        for record in records:
            for image in (*record.source_images, record.target_image):
                assert not (_triples_in_file_name(image) & held), (record.location, image)
    for task, records in heldout.items():
        for record in records:
            # every held-out target shows a held-out combination; its sources may be training scenes
            assert _triples_in_file_name(record.target_image) & held, (task, record.location)
    # every colour, shape and position (and colour-shape pair) still appears in training
    seen = {t for records in train.values() for r in records for t in _triples_in_file_name(r.target_image)}
    assert {c for c, _, _ in seen} == {c for c, _, _ in held} | {c for c, _, _ in seen}
    assert {(c, s) for c, s, _ in seen} == {(o.colour, o.shape) for o in all_objects()}


def test_world_records_are_spec_jsonl(world):
    line = json.loads((world / "train" / "edit.jsonl").read_text().splitlines()[0])
    assert set(line) == {"image", "conversations", "instruction"}
    assert [turn["from"] for turn in line["conversations"]] == ["human", "gpt"]
    vqa = read_split(world, "heldout")["vqa"][0]
    assert vqa.task == TaskKind.UNDERSTANDING and vqa.question.endswith("?") and vqa.caption
    composition = read_split(world, "train")["composition"][0]
    assert len(composition.source_images) == 2
    assert objects_in(composition.caption) is not None and len(objects_in(composition.caption)) == 2


def test_checker_reads_every_drawn_object_back():
    for obj in all_objects():
        for seed in range(3):
            found = find_objects(draw_scene(Scene((obj,)), 64, seed))
            assert len(found) == 1 and found[0].matches(obj, ("colour", "shape", "position", "size")), (obj, seed)
    pair = Scene((ShapeObject("red", "triangle", "left", "large"), ShapeObject("blue", "circle", "top", "small")))
    assert sorted((o.colour, o.shape, o.position) for o in find_objects(draw_scene(pair, 64, 5))) == [
        ("blue", "circle", "top"),
        ("red", "triangle", "left"),
    ]
    assert find_objects(Image.new("RGB", (64, 64), (245, 245, 245))) == []


def test_checker_words_and_masks():
    assert colours_in("A red square and a Blue circle.") == {"red", "blue"}
    assert shapes_in("two squares and a circle") == {"square", "circle"}
    assert positions_in("a red square on the left and a circle at the top") == {"left", "top"}
    assert objects_in("a large red square on the left") == [ShapeObject("red", "square", "left")]
    assert objects_in("a red thing somewhere") is None
    scene = Scene((ShapeObject("green", "square", "middle", "large"),))
    assert mask_iou(draw_mask(scene), draw_mask(scene)) == 1.0
    left = Scene((ShapeObject("green", "square", "left", "small"),))
    right = Scene((ShapeObject("green", "square", "right", "small"),))
    assert mask_iou(draw_mask(left), draw_mask(right)) == 0.0
    # the square's edge map is its outline: 4 sides of a 2-pixel band around a 20-pixel square at 64 px
    assert 0 < mask_iou(draw_edges(scene), draw_mask(scene)) < 0.5


def _write_true_outputs(jobs, world: Path) -> None:
    """What a perfect model would write for every job."""
    for job in jobs:
        for record, output in zip(job.records, job.outputs, strict=True):
            output.parent.mkdir(parents=True, exist_ok=True)
            if job.task in ("caption", "vqa"):
                output.write_text(record.caption + "\n")
            else:
                shutil.copy(record.target_image, output)


def test_scores_are_one_for_true_outputs_and_zero_for_blank_ones(world, tmp_path):
    assert checks_world(world)
    jobs = plan_jobs(world, tmp_path / "outputs")
    assert {job.task for job in jobs} == {"t2i", "caption", "edit", "perception", "composition", "vqa"}
    _write_true_outputs(jobs, world)
    perfect = score_outputs(jobs)
    assert len(perfect) == 12 and all(value == 1.0 for value in perfect.values()), perfect

    for job in jobs:
        for output in job.outputs:
            if output.suffix == ".png":  # an empty scene; an empty (black) map for perception
                background = (0, 0, 0) if job.task == "perception" else (245, 245, 245)
                Image.new("RGB", (64, 64), background).save(output)
            else:
                output.write_text("\n")
    blank = score_outputs(jobs)
    assert all(value == 0.0 for value in blank.values()), blank

    for output in jobs[0].outputs:  # missing outputs are failures, not skips
        output.unlink()
    assert score_outputs(jobs)["t2i colour"] == 0.0
    table = format_table({"untrained": blank, "trained": perfect})
    assert "| t2i colour | 0.00 | 1.00 |" in table


def test_t2i_job_batches_prompts_in_file_order(world, tmp_path):
    jobs = plan_jobs(world, tmp_path)
    (t2i,) = [job for job in jobs if job.task == "t2i"]
    assert t2i.line["prompt"] == [record.prompt for record in read_split(world, "heldout")["t2i"]]
    assert [p.name for p in t2i.outputs[:2]] == ["00000.png", "00001.png"]


def test_several_t2i_draws_have_their_own_seeds_and_folders_and_all_count(world, tmp_path):
    jobs = [job for job in plan_jobs(world, tmp_path, seed=5, t2i_samples=3) if job.task == "t2i"]
    assert [job.line["seed"] for job in jobs] == [5, 6, 7]
    assert [job.outputs[0].relative_to(tmp_path).as_posix() for job in jobs] == [
        "t2i/00000.png",
        "t2i/sample1/00000.png",
        "t2i/sample2/00000.png",
    ]
    assert all(job.line["output"] == str(job.outputs[0].parent) for job in jobs)
    _write_true_outputs(jobs, world)
    # one of three draws of the first prompt shows nothing: that prompt scores 2/3, every other 1
    Image.new("RGB", (64, 64), (245, 245, 245)).save(jobs[1].outputs[0])
    prompts = len(jobs[0].records)
    assert score_outputs(jobs)["t2i colour"] == pytest.approx(1 - 1 / (3 * prompts))
    with pytest.raises(ValueError, match="t2i_samples"):
        plan_jobs(world, tmp_path, t2i_samples=0)


def test_dataset_folder_errors_name_file_and_line(tmp_path):
    with pytest.raises(DatasetFolderError, match="no such folder"):
        split_files(tmp_path, "train")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "pictures.jsonl").write_text("")
    with pytest.raises(DatasetFolderError, match=r"unknown task file\(s\) \['pictures.jsonl'\]"):
        split_files(tmp_path, "train")
    (tmp_path / "train" / "pictures.jsonl").unlink()
    t2i = tmp_path / "train" / "t2i.jsonl"
    Image.new("RGB", (48, 48)).save(tmp_path / "train" / "a.png")
    good = {"image": ["a.png"], "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "<image>"}]}
    t2i.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(DatasetFolderError, match=r"t2i.jsonl:2: not valid JSON"):
        read_split(tmp_path, "train")
    t2i.write_text(json.dumps(good) + "\n" + json.dumps({**good, "image": ["b.png"]}) + "\n")
    with pytest.raises(DatasetFolderError, match=r"t2i.jsonl:2: image not found: .*b.png"):
        read_split(tmp_path, "train")


def test_vae_training_improves_reconstruction():
    scenes = [Scene((obj,)) for obj in all_objects()[::6]]
    pixels = images_to_tensor([draw_scene(scene, 48) for scene in scenes], 48)
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": 48})
    before = reconstruction_psnr(vae.eval(), pixels)
    report = train_vae(vae, pixels, max_steps=60, target_psnr=99.0, batch_size=8, check_every=60)
    assert report.steps == 60 and report.psnr > before + 5, (before, report)
    # the latent scaling now standardises the data's latents
    with torch.no_grad():
        means = vae.encode(pixels).latent_dist.mean
    scaled = (means - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(scaled.mean())) < 1e-3 and abs(float(scaled.std()) - 1) < 1e-3


def test_seed_table_shows_mean_spread_and_the_paired_difference():
    scores = {
        "untrained": [0.1, 0.1, 0.1],
        "aligned": [0.9, 0.8, 1.0],
        "no_alignment": [0.7, 0.8, 0.9],
    }
    per_seed = [{name: {"t2i colour": values[k]} for name, values in scores.items()} for k in range(3)]
    table = format_seed_table(per_seed, ("untrained", "aligned", "no_alignment"))
    # aligned - no_alignment, seed by seed: 0.2, 0.0, 0.1 -> mean 0.1, sample std 0.1
    assert table.splitlines() == [
        "| metric | untrained | aligned | no_alignment | aligned - no_alignment |",
        "|---|---:|---:|---:|---:|",
        "| t2i colour | 0.10 ± 0.00 | 0.90 ± 0.10 | 0.80 ± 0.10 | +0.10 ± 0.10 |",
    ]
    one_seed = format_seed_table(per_seed[:1], ("untrained", "aligned", "no_alignment"))
    assert one_seed.splitlines()[-1] == "| t2i colour | 0.10 | 0.90 | 0.70 | +0.20 |"


def test_retrieval_counts_a_caption_of_the_same_tokens_as_reachable():
    # captions 0 and 1 are the same tokens in another order (and 2 is padded shorter); the mean-embedding text target
    # cannot tell 0 from 1, so choosing 1 for image 0 is wrong but reachable, choosing 2 for image 1 is neither
    input_ids = torch.tensor([[5, 6, 7, 8, 1], [7, 6, 5, 8, 1], [5, 9, 1, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    retrieval = score_retrieval(torch.tensor([1, 2, 2]), torch.tensor([0, 1, 2]), input_ids, attention_mask)
    assert retrieval == Retrieval(exact=1 / 3, same_tokens=2 / 3)
    assert str(retrieval) == "0.33 (0.67 up to token order)"


def _two_blob_folder(root: Path) -> Path:
    """A dataset folder of another world: two coloured 80 px blobs, in both splits."""
    colours = {"teal": (0, 128, 128), "pink": (255, 105, 180)}
    for split in ("train", "heldout"):
        (root / split).mkdir(parents=True)
        lines = []
        for k, (name, rgb) in enumerate(colours.items()):
            Image.new("RGB", (80, 80), rgb).save(root / split / f"{k}.png")
            turns = [{"from": "human", "value": f"a {name} blob"}, {"from": "gpt", "value": "<image>"}]
            lines.append(json.dumps({"image": [f"{k}.png"], "conversations": turns}))
        (root / split / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_components_fit_any_dataset_folder(tmp_path):
    """Another world: other words, other image size. The tokenizer learns its words; the VAE its images."""
    root = _two_blob_folder(tmp_path / "data")
    folders, report = make_dataset_components(
        root, tmp_path / "components", vae_max_steps=3, vae_target_psnr=99, t5_steps=0, teacher_steps=4
    )
    assert report.image_size == 80 and report.vae.steps == 3 and report.t5 is None
    assert report.teacher.steps == 4 and report.teacher.heldout is not None  # scored on the held-out pairs too
    tokenizer = AutoTokenizer.from_pretrained(folders.tokenizer)
    assert tokenizer.unk_token_id not in tokenizer("a teal blob").input_ids
    # whole words, one token each, as T5's unigram tokenizer reads the BPE-trained pieces
    assert tokenizer.tokenize("a teal blob") == ["▁a", "▁teal", "▁blob"]
    assert dataset_text_length(root, tokenizer) == 4  # three words and </s>
    assert "<extra_id_0>" in tokenizer.get_vocab() and len(tokenizer) == report.vocab_size
    assert AutoencoderKL.from_pretrained(folders.vae).config.sample_size == 80
    assert not checks_world(root)  # the built-in checker knows no teal blobs
    again, second = make_dataset_components(root, tmp_path / "components")
    assert second.vae is None and second.t5 is None  # reused


def test_an_interrupted_component_build_leaves_nothing_for_the_next_run_to_reuse(tmp_path, monkeypatch):
    root = _two_blob_folder(tmp_path / "data")
    components = tmp_path / "components"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    settings = dict(vae_max_steps=2, vae_target_psnr=99, t5_steps=2, teacher_steps=2)
    monkeypatch.setattr("unialignment.toy.components.pretrain_tiny_teacher", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_dataset_components(root, components, **settings)
    # T5 and the VAE were complete; the teacher, built but not trained, is not left in place (nor a temporary)
    assert sorted(p.name for p in components.iterdir()) == ["text_encoder", "tokenizer", "vae"]

    monkeypatch.setattr("unialignment.toy.components.pretrain_tiny_t5", interrupted)
    shutil.rmtree(components / "text_encoder")
    with pytest.raises(KeyboardInterrupt):
        make_dataset_components(root, components, **settings)
    assert not (components / "text_encoder").exists() and not list(components.glob(".*"))

    monkeypatch.undo()
    _, report = make_dataset_components(root, components, **settings)
    assert report.vae is None  # reused: it was complete
    assert report.t5.steps == 2 and report.teacher.steps == 2  # rebuilt and trained, not reused half-made
    assert (components / "teacher" / "config.json").is_file()


def test_t5_pretraining_tells_masked_positions_apart(tmp_path):
    """Two masked positions between the same clean tokens ("a _ _ </s>" of "a teal blob") must encode differently
    for the text stream to know which word goes where: a random tiny T5 barely separates them, the pretrained one
    does, and its masked-token loss falls well below where it started."""
    corpus = [f"a {colour} {shape}" for colour in ("teal", "pink", "plum") for shape in ("blob", "dot")]
    tokenizer_dir, encoder_dir = make_tiny_t5(tmp_path, corpus=corpus * 20, model_type="bpe")
    tokenizer = load_t5_tokenizer(tokenizer_dir)
    a, eos, mask = tokenizer("a").input_ids[0], tokenizer.eos_token_id, mask_token_id(tokenizer)
    ids = torch.tensor([[a, mask, mask, eos]])

    def gap() -> float:  # 1 - cosine similarity of the states of the two masked positions
        with torch.no_grad():
            states = T5EncoderModel.from_pretrained(encoder_dir)(ids).last_hidden_state[0]
        return 1 - float(torch.cosine_similarity(states[1], states[2], dim=0))

    before = gap()
    report = pretrain_tiny_t5(tokenizer_dir, encoder_dir, corpus, steps=200)
    assert report.last_loss < 0.5 * report.first_loss
    assert gap() > 5 * before


def test_teacher_pretraining_matches_images_with_their_captions(tmp_path):
    """After a short contrastive training, the saved teacher's image target of each picture is closer to its own
    caption's text target than to any other caption's, as loaded by the trainer's own `QwenVLTeacher`."""
    colours = {"teal": (0, 128, 128), "pink": (255, 105, 180), "plum": (142, 69, 133), "gold": (255, 200, 0)}
    images, captions = [], []
    for name, rgb in colours.items():
        for shape in ("blob", "bar"):
            image = Image.new("RGB", (64, 64), (245, 245, 245))
            box = (16, 16, 48, 48) if shape == "blob" else (8, 26, 56, 38)
            ImageDraw.Draw(image).rectangle(box, fill=rgb)
            path = tmp_path / f"{name}_{shape}.png"
            image.save(path)
            images.append(path)
            captions.append(f"a {name} {shape}")
    folder = make_tiny_teacher(tmp_path / "teacher", corpus=captions * 10)
    report = pretrain_tiny_teacher(
        folder, images * 4, captions * 4, steps=80, batch_size=16, text_length=8, heldout=(images, captions)
    )
    assert report.last_loss < 0.5 * report.first_loss
    assert report.retrieval_before.exact < 0.5 and report.retrieval_after.exact == 1.0
    assert report.heldout == report.retrieval_after  # the same pairs, scored after training

    teacher = QwenVLTeacher.from_pretrained(folder, torch.float32, max_text_length=8)
    image_targets = torch.nn.functional.normalize(teacher.image_targets([Image.open(p) for p in images]), dim=-1)
    text_targets = torch.nn.functional.normalize(teacher.text_targets(captions), dim=-1)
    assert torch.equal((image_targets @ text_targets.T).argmax(-1), torch.arange(len(captions)))
