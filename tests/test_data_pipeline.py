"""The data pipeline end to end on generated data: validation report, bad-image replacement, batches of every
task through a DataLoader, aspect-ratio buckets, 2-rank sharding, and cached features equal to online ones."""

import copy
import dataclasses
import io
import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from unialignment.data.collate import Collator
from unialignment.data.dataset import UniAlignmentDataset, build_task_groups
from unialignment.data.feature_cache import components_fingerprint
from unialignment.data.features import prepare_training_batch, write_feature_cache
from unialignment.data.records import TaskKind
from unialignment.data.sampler import SampleKey, TaskMixingSampler
from unialignment.frozen.components import FrozenComponents, load_frozen_components
from unialignment.frozen.text_encoder import FrozenT5
from unialignment.toy.components import load_tiny_components, make_tiny_components, tiny_components_config
from unialignment.toy.shapes import all_scenes, draw_scene


def _t2i(image, caption, **extra):
    turns = [{"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}]
    return {"image": [image], "conversations": turns, **extra}


def _edit(source, target, instruction, caption):
    turns = [{"from": "human", "value": caption}, {"from": "gpt", "value": ""}]
    return {"image": [source, target], "conversations": turns, "instruction": instruction}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small dataset folder: good images, a corrupt and a truncated PNG, and JSONL files with bad lines."""
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    scenes = all_scenes()[:12]
    for number, scene in enumerate(scenes):
        draw_scene(scene, 40).save(root / "img" / f"{number}.png")
    draw_scene(scenes[0], 64).resize((64, 32)).save(root / "img" / "wide.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    buffer = io.BytesIO()
    draw_scene(scenes[1], 40).save(buffer, format="PNG")
    (root / "img" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    t2i_lines = [json.dumps(_t2i(f"img/{n}.png", scene.caption)) for n, scene in enumerate(scenes)]
    t2i_lines += [
        "",  # an empty line
        "{not json",  # malformed
        json.dumps({"image": "img/0.png", "conversations": []}),  # wrong types
        json.dumps(_t2i("img/missing.png", "a ghost")),  # missing file
        json.dumps(_t2i(str(root / "img" / "3.png"), "an absolute path, ünïcødé ✓ " + "very long " * 200)),
        json.dumps(_t2i("img/corrupt.png", "fails to decode")),
        json.dumps(_t2i("img/truncated.png", "fails half way")),
        json.dumps(_t2i("img/wide.png", "a wide picture", img_w=[64], img_h=[32])),
    ]
    (root / "t2i.jsonl").write_text("\n".join(t2i_lines) + "\n", encoding="utf-8")
    edit_lines = [
        json.dumps(_edit(f"img/{n}.png", f"img/{n + 1}.png", "change it", scenes[n + 1].caption)) for n in range(11)
    ]
    (root / "edit.jsonl").write_text("\n".join(edit_lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def component_folders(tmp_path_factory):
    return make_tiny_components(tmp_path_factory.mktemp("components"))


@pytest.fixture(scope="module")
def components(component_folders):
    tiny = load_tiny_components(component_folders, max_text_length=24)
    return FrozenComponents(tiny.t5, tiny.vae, tiny.teacher)


def _groups(world, **kwargs):
    return [
        {"name": "t2i", "weight": 1, "datasets": [{"path": str(world / "t2i.jsonl"), "task": "t2i"}]},
        {"name": "edit", "weight": 1, "datasets": [{"path": str(world / "edit.jsonl"), "task": "edit"}]},
    ]


def test_validation_reports_every_bad_line_and_enforces_the_threshold(world, tmp_path):
    report = tmp_path / "skipped.txt"
    groups = build_task_groups(_groups(world), 32, report_path=report, max_bad_fraction=0.5)
    assert [len(group) for group in groups] == [12 + 4, 11]
    lines = report.read_text().splitlines()
    for line_number, reason in ((14, "JSON"), (15, "image"), (16, "missing.png")):
        assert any(line.startswith(f"{world / 't2i.jsonl'}:{line_number}:") and reason in line for line in lines), lines
    with pytest.raises(ValueError, match="t2i.jsonl"):
        build_task_groups(_groups(world), 32, max_bad_fraction=0.05)


def test_loader_yields_batches_of_each_task_and_replaces_unreadable_images(world, components):
    groups = build_task_groups(_groups(world), 32, max_bad_fraction=0.5)
    dataset = UniAlignmentDataset(groups)
    sampler = TaskMixingSampler([g.pool_sizes for g in groups], [g.weight for g in groups], 4, num_steps=8, seed=1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(components.t5.tokenizer, 24), num_workers=2)
    batches = list(loader)
    assert [batch.tasks[0] for batch in batches] == [TaskKind.TEXT_TO_IMAGE, TaskKind.EDIT] * 4
    replaced = [failure for batch in batches for failure in batch.replaced]
    assert any("corrupt.png" in failure or "t2i.jsonl:18" in failure for failure in replaced)
    assert any("t2i.jsonl:19" in failure for failure in replaced)
    for batch in batches:
        assert batch.target_pixels.shape == (4, 3, 32, 32)
        assert batch.prompt_ids.shape == batch.caption.input_ids.shape == (4, 24)
        assert len(batch.source_pixels) == (1 if batch.tasks[0] == TaskKind.EDIT else 0)
        assert all("corrupt" not in location and "truncated" not in location for location in batch.locations)
    assert sum(batch.num_truncated for batch in batches) >= 1  # the over-long caption was drawn and cut


def test_a_group_that_cannot_be_read_stops_with_every_location(world, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(_t2i(str(world / "img" / "corrupt.png"), "broken")) + "\n")
    groups = build_task_groups([{"name": "broken", "datasets": [{"path": str(tmp_path / "bad.jsonl")}]}], 32)
    with pytest.raises(RuntimeError, match="bad.jsonl:1"):
        UniAlignmentDataset(groups, max_attempts=3)[SampleKey(0, 0, 0, 0, 0)]


def test_aspect_ratio_buckets_batch_same_size_images(world):
    (group, _) = build_task_groups(_groups(world), 64, aspect_ratio_buckets=True, max_bad_fraction=0.5)
    assert len(group.pool_buckets) == 2  # the square records and the one stated 64 x 32
    wide = group.pool_buckets.index(max(group.pool_buckets, key=lambda hw: hw[1] / hw[0]))
    sample = UniAlignmentDataset([group])[SampleKey(0, wide, 0, 0, 0)]
    height, width = group.pool_buckets[wide]
    assert width > height and sample.target_pixels.shape == (3, height, width)


def test_two_ranks_read_disjoint_records_within_an_epoch(world):
    groups = build_task_groups(_groups(world), 32, max_bad_fraction=0.5)
    dataset = UniAlignmentDataset(groups)
    seen = []
    for rank in range(2):
        sampler = TaskMixingSampler([g.pool_sizes for g in groups], [1, 1], 2, rank=rank, world_size=2, num_steps=4)
        seen.append({dataset[key].location for batch in sampler for key in batch if key.group == 1})
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]


def test_cached_and_online_features_give_the_same_batches(world, components):
    groups = build_task_groups(_groups(world), 32, max_bad_fraction=0.5)
    for group in groups:
        for index in group.indexes:
            write_feature_cache(index, components, 32, 3, shard_size=5, storage_dtype=torch.float32, progress=False)
    collator = Collator(components.t5.tokenizer, 24)
    fingerprint = components_fingerprint(components)
    online_dataset = UniAlignmentDataset(groups)
    cached_dataset = UniAlignmentDataset(groups, use_feature_cache=True, components_fingerprint=fingerprint)
    assert all(readers is not None for readers in cached_dataset.cache_readers)
    sampler = TaskMixingSampler([g.pool_sizes for g in groups], [1, 1], 3, num_steps=4, seed=5)
    for keys in sampler:
        online, cached = collator([online_dataset[k] for k in keys]), collator([cached_dataset[k] for k in keys])
        assert cached.target_pixels is None and cached.features is not None
        assert online.locations == cached.locations
        a = prepare_training_batch(online, components, torch.Generator().manual_seed(0), "cpu")
        b = prepare_training_batch(cached, components, torch.Generator().manual_seed(0), "cpu")
        # Stored in float32 here, the two paths agree to float rounding (batches differ in composition).
        for name in ("target_latents", "prompt_embeds", "teacher_image_targets", "teacher_text_targets"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-4)
        for online_latents, cached_latents in zip(a.condition_latents or [], b.condition_latents or [], strict=True):
            torch.testing.assert_close(cached_latents, online_latents, atol=1e-5, rtol=1e-4)
        assert torch.equal(a.caption_ids, b.caption_ids)


def test_a_cache_of_other_components_is_not_used(world, components, tmp_path, caplog):
    """Features written by one set of frozen components must never reach a run with another: another text length,
    another mask embedding or other weights give another fingerprint, and the dataset encodes online."""
    groups = build_task_groups(_groups(world), 32, max_bad_fraction=0.5)[:1]
    for index in groups[0].indexes:
        write_feature_cache(index, components, 32, 3, shard_size=5, storage_dtype=torch.float32, progress=False)
    fingerprint = components_fingerprint(components)
    assert UniAlignmentDataset(groups, use_feature_cache=True, components_fingerprint=fingerprint).cache_readers[0]

    t5 = components.t5
    # FrozenT5 records its length in the tokenizer, so each gets its own copy of the shared fixture's
    longer = FrozenT5(copy.deepcopy(t5.tokenizer), t5.encoder, max_length=t5.max_length + 1)
    other_mask = copy.deepcopy(t5.encoder)
    other_mask.get_input_embeddings().weight.data[t5.mask_token_id] += 1.0
    other_mask_t5 = FrozenT5(copy.deepcopy(t5.tokenizer), other_mask, max_length=t5.max_length)
    other_vae = copy.deepcopy(components.vae)
    other_vae.vae.decoder.conv_out.bias.data += 1.0  # the first values of one tensor suffice
    others = {
        "text length": FrozenComponents(longer, components.vae, components.teacher),
        "mask embedding": FrozenComponents(other_mask_t5, components.vae, components.teacher),
        "vae": FrozenComponents(t5, other_vae, components.teacher),
        "no teacher": FrozenComponents(t5, components.vae, None),
    }
    for what, other in others.items():
        caplog.clear()
        dataset = UniAlignmentDataset(
            groups, use_feature_cache=True, components_fingerprint=components_fingerprint(other)
        )
        assert dataset.cache_readers[0] is None, what
        assert "stale (components changed)" in caplog.text, what
    with pytest.raises(ValueError, match="components_fingerprint"):
        UniAlignmentDataset(groups, use_feature_cache=True)


def test_a_stale_cache_names_the_setting_that_changed_and_how_to_rebuild(world, component_folders, tmp_path, caplog):
    """Every setting that changes a cached value is in the fingerprint: each changed alone, the cache is refused
    (the group encodes online) with a warning that names it and the command that rebuilds the cache."""
    settings = tiny_components_config(component_folders, max_text_length=24)
    groups = build_task_groups(_groups(world), 32, max_bad_fraction=0.5)[:1]
    for index in groups[0].indexes:
        write_feature_cache(
            index, load_frozen_components(settings), 32, 3, shard_size=5, storage_dtype=torch.float32, progress=False
        )
    mask_file = tmp_path / "mask.pth"
    torch.save(torch.randn(32), mask_file)
    other_vae = tmp_path / "vae"  # another folder: the same weights, another config
    shutil.copytree(component_folders.vae, other_vae)
    config = json.loads((other_vae / "config.json").read_text())
    (other_vae / "config.json").write_text(json.dumps({**config, "scaling_factor": config["scaling_factor"] * 2}))
    changes = {
        "components.text_length": dict(text_length=25),
        "components.teacher_average_padding": dict(teacher_average_padding=False),
        "components.mask_embedding": dict(mask_embedding=str(mask_file)),
        "components.dtype": dict(dtype="bfloat16"),
        "components.vae (config)": dict(vae=str(other_vae)),
    }
    for setting, change in changes.items():
        caplog.clear()
        fingerprint = components_fingerprint(load_frozen_components(dataclasses.replace(settings, **change)))
        dataset = UniAlignmentDataset(groups, use_feature_cache=True, components_fingerprint=fingerprint)
        assert dataset.cache_readers[0] is None, setting
        assert setting in caplog.text and "scripts/cache_features.py CONFIG" in caplog.text, (setting, caplog.text)

    # The cache of another resolution is a folder of its own: asked for at 64 px, the 32 px one is named.
    caplog.clear()
    at_64 = build_task_groups(_groups(world), 64, max_bad_fraction=0.5)[:1]
    fingerprint = components_fingerprint(load_frozen_components(settings))
    assert (
        UniAlignmentDataset(at_64, use_feature_cache=True, components_fingerprint=fingerprint).cache_readers[0] is None
    )
    assert "none at resolution 64 px (there is one at 32px)" in caplog.text
    assert "scripts/cache_features.py CONFIG" in caplog.text
    # Unchanged settings read the cache.
    assert UniAlignmentDataset(groups, use_feature_cache=True, components_fingerprint=fingerprint).cache_readers[0]
