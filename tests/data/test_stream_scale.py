"""Streaming at scale: disjoint rank splits, replay, bounded memory, half-precision caches, per-shard cache resume."""
import json
import pytest
import torch
from proalign.data.cache import EmbeddingCache, PairedFeatureStream


def _caption_shards(write_shard, tmp_path, shards=3, per_shard=7):
    """JSON-only shards (stage 1 reads no images): sample k of shard s has the caption `s-k`."""
    urls = []
    for s in range(shards):
        members = [(f"x{s}-{k}.json", json.dumps({"captions": {"en": [f"{s}-{k}"]}}).encode())
                   for k in range(per_shard)]
        urls.append(str(write_shard(tmp_path / f"caps-{s:03d}.tar", members)))
    return urls


def _code(texts):
    """A row that names its caption: (shard, sample)."""
    return torch.tensor([[float(t.split("-")[0]), float(t.split("-")[1])] for t in texts])


def _paired(tmp_path, urls, dtype="float32"):
    llm = EmbeddingCache(tmp_path / "cache", "llm", "a" * 16, dtype)
    teacher = EmbeddingCache(tmp_path / "cache", "clip", "b" * 16)
    for cache in (llm, teacher):
        cache.build(urls, _code, ["en"], progress=False)
    return llm, teacher


@pytest.mark.parametrize("shards", [3, 1])  # by shard, and by row ranges when shards < readers
def test_paired_stream_splits_every_epoch_disjointly_across_ranks(write_shard, tmp_path, monkeypatch, shards):
    urls = _caption_shards(write_shard, tmp_path, shards)
    llm, teacher = _paired(tmp_path, urls)
    total = shards * 7
    seen = []
    for rank in range(2):
        monkeypatch.setattr(PairedFeatureStream, "layout", lambda self, rank=rank: (0, rank, 2))
        stream = iter(PairedFeatureStream(urls, llm, teacher, ["en"], seed=1, shuffle_buffer=4))
        # by shard; one shard is split into contiguous row ranges, [0, 3) and [3, 7)
        per_epoch = len(urls[rank::2]) * 7 if shards >= 2 else 7 * (rank + 1) // 2 - 7 * rank // 2
        rows = [next(stream) for _ in range(per_epoch)]
        assert all(torch.equal(r["llm"], r["teacher"]) for r in rows)  # the same caption's two rows
        seen.append({tuple(r["llm"].tolist()) for r in rows})
        assert len(seen[-1]) == per_epoch  # no caption twice within an epoch
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == total


def test_paired_stream_shuffles_per_epoch_and_replays_exactly(write_shard, tmp_path):
    urls = _caption_shards(write_shard, tmp_path)
    llm, teacher = _paired(tmp_path, urls)
    take = lambda n: [tuple(next(s)["llm"].tolist()) for s in [iter(PairedFeatureStream(  # noqa: E731
        urls, llm, teacher, ["en"], seed=3, shuffle_buffer=5))] for _ in range(n)]
    first, again = take(42), take(42)
    assert first == again  # the same seed gives the same order (what resume replays)
    assert sorted(first[:21]) == sorted(first[21:]) and first[:21] != first[21:]  # each epoch all, reshuffled


@pytest.mark.slow  # runs stage 1 and stage 2 to check a guard
def test_training_never_loads_a_whole_cache(tiny_cfg, monkeypatch):
    """Stage 1 and stage 2 read the training captions shard by shard: the all-in-memory loader is
    refused for the training shards."""
    from proalign.stages.stage1 import run_stage1
    from proalign.stages.stage2 import run_stage2
    real_load = EmbeddingCache.load
    train = set(tiny_cfg.data.train_shards)

    def guarded(self, shards, languages=None):
        assert not set(shards) & train, "a training cache was loaded whole"
        return real_load(self, shards, languages)
    monkeypatch.setattr(EmbeddingCache, "load", guarded)
    tiny_cfg.stage1.train.steps = tiny_cfg.stage2.train.steps = 3
    tiny_cfg.stage2.train.eval_every = 0
    tiny_cfg.data.max_eval_samples = 10
    assert run_stage1(tiny_cfg, progress=False)["train_captions"] > 0
    tiny_cfg.init_from = f"{tiny_cfg.output_dir}/stage1.safetensors"
    run_stage2(tiny_cfg, progress=False)


def test_half_precision_cache_halves_the_bytes_and_reads_back_as_float32(write_shard, tmp_path):
    urls = _caption_shards(write_shard, tmp_path, shards=1, per_shard=200)
    wide = lambda texts: torch.randn(len(texts), 512, generator=torch.Generator().manual_seed(0))  # noqa: E731
    sizes = {}
    for dtype in ("float32", "bfloat16", "float16"):
        cache = EmbeddingCache(tmp_path / dtype, "llm", "c" * 16, dtype)
        cache.build(urls, wide, ["en"], progress=False)
        sizes[dtype] = cache.sidecar(urls[0]).stat().st_size
        ids, rows, _ = cache.load(urls, ["en"])
        assert rows.dtype == torch.float32 and rows.shape == (200, 512)
        assert torch.allclose(rows, wide(ids), rtol=1e-2, atol=1e-2)
    assert sizes["bfloat16"] < 0.52 * sizes["float32"] and sizes["float16"] < 0.52 * sizes["float32"]
    # another storage type makes the sidecar stale, never silently reinterpreted
    from proalign.data.cache import StaleCacheError
    stale = EmbeddingCache(tmp_path / "float32", "llm", "c" * 16, "bfloat16")
    with pytest.raises(StaleCacheError, match="stored as float32, not bfloat16"):
        stale.load(urls, ["en"])


def test_cache_build_resumes_per_shard_after_a_crash(write_shard, tmp_path):
    """A build killed in its second shard keeps the first shard's sidecar (written atomically) and
    the next build encodes only what is missing."""
    urls = _caption_shards(write_shard, tmp_path, shards=3)
    cache = EmbeddingCache(tmp_path / "cache", "llm", "d" * 16)
    calls = []

    def dies_on_second_shard(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        return _code(texts)
    with pytest.raises(KeyboardInterrupt):
        cache.build(urls, dies_on_second_shard, ["en"], progress=False)
    assert sorted(p.name for p in cache.dir.iterdir()) == [cache.sidecar(urls[0]).name]
    stats = cache.build(urls, _code, ["en"], progress=False)
    assert stats["shards_reused"] == 1 and stats["shards_encoded"] == 2
    ids, rows, _ = cache.load(urls, ["en"])
    assert torch.equal(rows, _code([cid.split("|")[0][1:] for cid in ids]))
