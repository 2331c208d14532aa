"""A stage whose embedding cache is complete never builds the embedder (at the paper's 8B
embedders that is 16 GB per rank for nothing); the result is the same as with it built."""
import copy
from pathlib import Path

import torch
from safetensors.torch import load_file


def test_a_complete_cache_trains_stage1_without_building_the_embedder_and_gives_the_same_model(tiny_cfg, tmp_path):
    from proalign.stages.stage1 import run_stage1
    tiny_cfg.stage1.train.steps = 6
    own = copy.deepcopy(tiny_cfg)
    own.data.cache_dir, own.output_dir = str(tmp_path / "cache"), str(tmp_path / "first")
    first = run_stage1(own, progress=False)  # an empty cache: the embedder is built to fill it
    assert first["embedder_built"] is True
    assert (tmp_path / "cache" / "embedders").is_dir()
    again = copy.deepcopy(own)
    again.output_dir = str(tmp_path / "again")
    second = run_stage1(again, progress=False)  # the cache it filled is complete now
    assert second["embedder_built"] is False
    a, b = (load_file(str(Path(c.output_dir) / "stage1.safetensors")) for c in (own, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the model file records the embedder all the same: it loads against the real one
    import proalign
    model, _, _ = proalign.load(Path(again.output_dir) / "stage1.safetensors", device="cpu")
    assert model.encode_text(["a cat"]).shape[-1] == a["adapter.proj.weight"].shape[0]


def test_a_caption_missing_from_the_cache_builds_the_embedder_and_says_so(tiny_cfg, caplog):
    import logging
    from proalign.stages.cache import cached_llm_features, training_model
    model = training_model(tiny_cfg)
    assert not model.embedder.built
    features = cached_llm_features(tiny_cfg, model, tiny_cfg.data.eval_shards, ["en"])
    with caplog.at_level(logging.INFO):
        rows = features(["not-cached|en|0"], ["a caption no shard holds"])
    assert model.embedder.built and rows.shape == (1, model.embedder.dim)
    assert "building the embedder: 1 caption(s) are not in the cache" in caplog.text
