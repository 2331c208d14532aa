"""Each sample is read once per epoch across all readers, a resume seeks to its saved position
instead of replaying, sources mix by weight, and a download cut short is a counted skip. Shards
are served by a real HTTP server that answers Range requests and logs every byte range it sends."""
from collections import Counter

import pytest
import torch
import torchvision.transforms as T

from proalign.data.cache import EmbeddingCache
from proalign.data.shards import ImageTextStream
from proalign.data.stream import Batcher
from proalign.data.stream import plan_epoch


def _encode(texts):
    return torch.tensor([[float(len(t)), 1.0] for t in texts])


def _served_shards(range_server, write_shard, image_text_members, tmp_path, shards, per_shard):
    """`shards` shards of `per_shard` samples, served; their cache built (which records each
    sample's byte range). Returns (urls, cache); the server's log is cleared."""
    folder, base, log, _ = range_server
    urls = []
    for s in range(shards):
        write_shard(folder / f"part-{s:03d}.tar", image_text_members(per_shard, start=s * per_shard))
        urls.append(f"{base}/part-{s:03d}.tar")
    cache = EmbeddingCache(tmp_path / "cache", "llm", "c" * 16)
    cache.build(urls, _encode, ["en"], progress=False)
    log.clear()
    return urls, cache


def _stream(urls, cache, **kw):
    return ImageTextStream(urls, T.ToTensor(), ["en"], seed=5, shuffle_buffer=kw.pop("shuffle_buffer", 3),
                           shard_index=cache.sample_spans, **kw)


def _as_reader(monkeypatch, reader, readers):
    monkeypatch.setattr(ImageTextStream, "layout", lambda self: (0, reader, readers))


def _bytes_read(log) -> Counter:
    """Bytes sent per file, counting a byte sent twice twice."""
    sent = Counter()
    for name, first, end in log:
        sent[name] += end - first
    return sent


@pytest.mark.parametrize("shards,readers", [(4, 16), (1, 2), (4, 4)])
def test_every_byte_of_an_epoch_is_read_once_across_readers(range_server, write_shard, image_text_members,
                                                            tmp_path, monkeypatch, shards, readers):
    """16 readers (e.g. 4 ranks x 4 workers) over 4 shards split each shard by its index; so do 2
    readers of 1 shard. Each sample is given once, and the server sends each byte once."""
    urls, cache = _served_shards(range_server, write_shard, image_text_members, tmp_path, shards, 10)
    log = range_server[2]
    keys = []
    for reader in range(readers):
        _as_reader(monkeypatch, reader, readers)
        stream = _stream(urls, cache)
        parts = plan_epoch(urls, 5, 0, reader, readers, stream.index_size)
        epoch = iter(stream)
        size = sum(((p.last or 10) - p.first) for p in parts)
        keys += [next(epoch)["caption_id"].split("|")[0] for _ in range(size)]
        epoch.close()
    assert sorted(keys) == sorted(f"s{i:03d}" for i in range(shards * 10))
    spans = {url.rsplit("/", 1)[1]: cache.sample_spans(url) for url in urls}
    assert _bytes_read(log) == {name: s[-1][2] - s[0][1] for name, s in spans.items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_seeks_to_its_position_and_goes_on_as_if_uninterrupted(range_server, write_shard,
                                                                       image_text_members, tmp_path, workers):
    urls, cache = _served_shards(range_server, write_shard, image_text_members, tmp_path, 2, 48)  # all in epoch 0
    log = range_server[2]
    uninterrupted = Batcher(_stream(urls, cache), 4, num_workers=workers)
    expected = [uninterrupted.next_batch() for _ in range(10)]
    interrupted = Batcher(_stream(urls, cache), 4, num_workers=workers)
    given = [interrupted.next_batch() for _ in range(5)]
    saved = interrupted.position()
    assert saved["samples_consumed"] == 20 and len(saved["readers"]) == max(1, workers)
    del uninterrupted, interrupted
    log.clear()
    resumed = Batcher(_stream(urls, cache), 4, num_workers=workers, position=saved)
    for want in expected[5:]:
        got = resumed.next_batch()
        assert got["caption_id"] == want["caption_id"]
        assert torch.equal(got["image"], want["image"])
    assert resumed.position()["samples_consumed"] == 40
    # no sample given before the checkpoint is read again: no requested range holds one
    where = {key: (url.rsplit("/", 1)[1], first, end) for url in urls for key, first, end in cache.sample_spans(url)}
    before = [where[cid.split("|")[0]] for batch in given for cid in batch["caption_id"]]
    assert log, "the resume read nothing"
    for name, first, end in log:
        clash = [s for s in before if s[0] == name and first < s[2] and s[1] < end]
        assert not clash, f"the resume read {name} bytes {first}-{end}, which hold samples given before it"


def test_a_position_from_another_reader_layout_is_refused(range_server, write_shard, image_text_members, tmp_path):
    from proalign.data.stream import ReaderLayoutError
    urls, cache = _served_shards(range_server, write_shard, image_text_members, tmp_path, 1, 8)
    batcher = Batcher(_stream(urls, cache), 2, num_workers=0)
    batcher.next_batch()
    with pytest.raises(ReaderLayoutError, match="1 reader.* per rank; this run has 2"):
        Batcher(_stream(urls, cache), 2, num_workers=2, position=batcher.position())


def test_a_download_cut_short_is_a_counted_truncation(range_server, write_shard, image_text_members, tmp_path):
    """The server announces the whole length and stops early: the samples up to the cut are read,
    the last (perhaps split) one is dropped, and `truncated_shard` is counted."""
    from proalign.data.shards import iter_raw_samples
    folder, base, _, cut = range_server
    shard = write_shard(folder / "cut-000.tar", image_text_members(10))
    whole = list(iter_raw_samples(f"{base}/cut-000.tar"))
    cut["cut-000.tar"] = shard.stat().st_size // 2
    skips = Counter()
    partial = list(iter_raw_samples(f"{base}/cut-000.tar", skips))
    assert skips["truncated_shard"] == 1
    assert 0 < len(partial) < len(whole)
    assert [s["__key__"] for s in partial] == [s["__key__"] for s in whole[:len(partial)]]
    assert all(a["jpg"] == b["jpg"] for a, b in zip(partial, whole))


def test_weighted_sources_are_drawn_in_proportion(write_shard, image_text_members, tmp_path):
    """Resampled epochs draw whole shards with replacement by their source's weight, and an
    epoch is `samples_per_epoch` samples across readers."""
    a = write_shard(tmp_path / "a-000.tar", image_text_members(4, start=0))
    b = write_shard(tmp_path / "b-000.tar", image_text_members(4, start=100))
    spec = [{"shards": str(a), "weight": 3}, {"shards": str(b), "weight": 1}]
    stream = ImageTextStream(spec, T.ToTensor(), ["en"], seed=2, shuffle_buffer=1, resampled=True,
                             samples_per_epoch=2000)
    items = iter(stream)
    from_a = sum(int(next(items)["caption_id"][1:4]) < 100 for _ in range(2000))
    draws = 2000 / 4  # whole shards of 4 samples
    se = (0.75 * 0.25 / draws) ** 0.5
    assert abs(from_a / 2000 - 0.75) < 4 * se, from_a
    assert stream.position()["epoch"] == 0  # the epoch is exactly 2000 samples: the next starts now
    next(items)
    assert stream.position()["epoch"] == 1


@pytest.mark.parametrize("data,field", [
    ({"train_shards": [{"shards": "x-{000..001}.tar", "weight": 2}]}, "data.train_shards"),
    ({"train_shards": ["x.tar"], "resampled": True}, "data.samples_per_epoch"),
    ({"train_shards": ["x.tar"], "samples_per_epoch": 100}, "data.samples_per_epoch"),
    ({"train_shards": [{"shards": "x.tar", "weight": -1}], "resampled": True, "samples_per_epoch": 9},
     "data.train_shards"),
    ({"train_shards": [{"shards": "x.tar", "wieght": 2}], "resampled": True, "samples_per_epoch": 9},
     "data.train_shards"),
])
def test_source_settings_that_disagree_are_errors_naming_the_field(data, field):
    from proalign.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict({"data": data}, missing_files=[])
