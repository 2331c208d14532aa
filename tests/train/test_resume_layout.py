"""A checkpoint records the reader layout (ranks x data workers) that its data position belongs to;
a resume on another layout would read other samples in another order, so it is refused, naming both."""
import re

import pytest
import torch


def _checkpoint(tmp_path, world, workers):
    from proalign.train.checkpoints import CheckpointManager
    from proalign.train.checkpoints import data_layout
    ckpt = CheckpointManager(tmp_path / "stage1")
    config = {"seed": 0, "data": {"num_workers": workers}, "stage1": {"train": {"steps": 10}}}
    ckpt.save(5, {"w": torch.zeros(1)}, None, {"config": config, "layout": data_layout(config, world)})
    return ckpt, config


@pytest.mark.parametrize("before, after, said", [
    ((1, 0), (2, 0), "1 rank(s) x 1 reader(s) each; this run has 2 rank(s) x 1"),
    ((2, 2), (2, 0), "2 rank(s) x 2 reader(s) each; this run has 2 rank(s) x 1")])
def test_a_resume_on_another_reader_layout_is_refused_naming_both(tmp_path, monkeypatch, before, after, said):
    from proalign.config import ConfigError
    from proalign.train.checkpoints import check_resume_config
    ckpt, config = _checkpoint(tmp_path, *before)
    monkeypatch.setenv("WORLD_SIZE", str(after[0]))
    resumed = {**config, "data": {"num_workers": after[1]}}
    with pytest.raises(ConfigError, match=f"--resume: .*written by {re.escape(said)}"):
        check_resume_config(resumed, ckpt, "stage1")


def test_a_resume_on_the_same_layout_passes(tmp_path, monkeypatch):
    from proalign.train.checkpoints import check_resume_config
    ckpt, config = _checkpoint(tmp_path, 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_resume_config(config, ckpt, "stage1") == []
