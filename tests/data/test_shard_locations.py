"""Shards where users keep them (folders with the same file names, a local HTTP server, `pipe:`
commands) get a cache of their own each, found again without reading any shard."""
import os

import pytest
import torch


def _encode(seen=None):
    def encode(texts):
        if seen is not None:
            seen.extend(texts)
        return torch.tensor([[float(len(t)), float(sum(map(ord, t)))] for t in texts])
    return encode


def test_same_named_shards_in_two_folders_each_keep_their_own_cache(write_shard, image_text_members, tmp_path):
    """img2dataset names every dataset's shards 00000.tar, 00001.tar, ..."""
    from proalign.data.cache import EmbeddingCache
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    train = write_shard(tmp_path / "train" / "shard-000.tar", image_text_members(3))
    test = write_shard(tmp_path / "test" / "shard-000.tar", image_text_members(2, start=10))
    cache = EmbeddingCache(tmp_path / "cache", "llm", "a" * 16)
    urls = [str(train), str(test)]
    assert cache.build(urls, _encode(), progress=False)["shards_encoded"] == 2
    assert cache.sidecar(urls[0]) != cache.sidecar(urls[1])
    assert cache.build(urls, _encode(), progress=False) == {"shards_reused": 2}
    cache.verify(urls)
    ids, _, extras = cache.load(urls)
    assert ids == [f"s{i:03d}|en|0" for i in (0, 1, 2, 10, 11)]
    assert extras["shard_samples"] == {str(train.resolve()): 3, str(test.resolve()): 2}


def test_shards_served_over_http_are_cached_and_found_again(http_server, write_shard, image_text_members, tmp_path):
    from proalign.data.cache import EmbeddingCache, PairedFeatureStream, StaleCacheError
    folder, base = http_server
    write_shard(folder / "emoji-000.tar", image_text_members(4))
    url = f"{base}/emoji-000.tar"
    llm, teacher = (EmbeddingCache(tmp_path / "cache", kind, "b" * 16) for kind in ("llm", "clip"))
    for cache in (llm, teacher):
        assert cache.build([url], _encode(), progress=False)["captions_encoded"] == 4
        assert cache.build([url], _encode(), progress=False) == {"shards_reused": 1}
    rows = list(zip(range(4), PairedFeatureStream([url], llm, teacher, ["en"], seed=0)))
    assert len(rows) == 4
    # the shard is replaced on the server: its sidecar is stale, and rebuilt
    write_shard(folder / "emoji-000.tar", image_text_members(5, start=20))
    os.utime(folder / "emoji-000.tar", (1, 1))
    with pytest.raises(StaleCacheError, match=f"{url} is its shard changed"):
        llm.load([url])
    assert llm.build([url], _encode(), progress=False)["captions_encoded"] == 5


def test_an_unreachable_shard_url_is_an_error_naming_it(free_port, tmp_path):
    from proalign.data.cache import EmbeddingCache
    from proalign.data.locations import ShardLocationError
    url = f"http://127.0.0.1:{free_port()}/gone-000.tar"
    with pytest.raises(ShardLocationError, match=f"{url}: cannot reach it"):
        EmbeddingCache(tmp_path / "cache", "llm", "c" * 16).build([url], _encode(), progress=False)


def test_a_missing_shard_on_a_server_is_an_error_naming_it(http_server, tmp_path):
    from proalign.data.cache import EmbeddingCache
    from proalign.data.locations import ShardLocationError
    _, base = http_server
    with pytest.raises(ShardLocationError, match=f"{base}/nope-000.tar: the server answered 404"):
        EmbeddingCache(tmp_path / "cache", "llm", "c" * 16).build([f"{base}/nope-000.tar"], _encode(), progress=False)


def test_pipe_shards_are_cached_by_their_command(write_shard, image_text_members, tmp_path):
    from proalign.data.cache import EmbeddingCache
    shard = write_shard(tmp_path / "p-000.tar", image_text_members(3))
    url = f"pipe:cat {shard}"
    cache = EmbeddingCache(tmp_path / "cache", "llm", "d" * 16)
    assert cache.build([url], _encode(), progress=False)["captions_encoded"] == 3
    assert cache.build([url], _encode(), progress=False) == {"shards_reused": 1}
    assert cache.sidecar(url) != cache.sidecar(str(shard))
    assert len(cache.load([url])[0]) == 3


def test_start_up_reads_no_shard_and_verify_reads_them_all(write_shard, image_text_members, tmp_path):
    """A shard rewritten with the same size and mtime is not seen at start (nothing is read);
    `verify` reads every shard and re-encodes the changed one."""
    from proalign.data.cache import EmbeddingCache
    shard = write_shard(tmp_path / "v-000.tar", image_text_members(4))
    cache = EmbeddingCache(tmp_path / "cache", "llm", "e" * 16)
    cache.build([str(shard)], _encode(), progress=False)
    stat = shard.stat()
    write_shard(shard, image_text_members(4, start=5))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size
    cache.verify([str(shard)])  # described, not read
    assert cache.load([str(shard)])[0][0] == "s000|en|0"
    stats = cache.build([str(shard)], _encode(), progress=False, verify=True)
    assert stats["shards_encoded"] == 1
    assert cache.load([str(shard)])[0][0] == "s005|en|0"
