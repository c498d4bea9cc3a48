"""Run-folder bookkeeping: `latest` only names complete checkpoints, pruning keeps it, resume finds it."""

import pytest

from unialignment.training import checkpoint as ckpt


def _make(root, *tags):
    for tag in tags:
        (root / "checkpoints" / tag).mkdir(parents=True)


def test_an_interrupted_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    _make(tmp_path, "step_00000002", "step_00000004")
    ckpt.write_latest(tmp_path, "step_00000002")  # step 4 was being written when the run was killed
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_00000002"
    assert ckpt.resolve_resume(str(tmp_path), "elsewhere") == tmp_path / "checkpoints" / "step_00000002"
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path / "fresh") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_pruning_keeps_the_newest_and_the_latest(tmp_path):
    _make(tmp_path, *(ckpt.tag_for_step(step) for step in (5, 10, 15, 20)))
    ckpt.write_latest(tmp_path, ckpt.tag_for_step(10))
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert [p.name for p in removed] == ["step_00000005"]
    assert remaining == ["step_00000010", "step_00000015", "step_00000020"]


def test_latest_is_replaced_atomically(tmp_path):
    _make(tmp_path, "step_00000001")
    ckpt.write_latest(tmp_path, "step_00000001")
    assert not list((tmp_path / "checkpoints").glob(".latest*"))
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
