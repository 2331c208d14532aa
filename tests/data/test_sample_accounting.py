"""Every sample accounted for: a repeated key never pairs one sample's image with another's
caption, and member names webdataset cannot split are counted, not silently dropped."""
import io
import json
from collections import Counter

import pytest
import torch
from PIL import Image


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _sample(key, color, caption):
    return [(f"{key}.png", _png(color)), (f"{key}.json", json.dumps({"captions": {"en": [caption]}}).encode())]


RED, BLUE, GREY = (250, 0, 0), (0, 0, 250), (128, 128, 128)


def _dup_shard(write_shard, path):
    return write_shard(path, _sample("s0", GREY, "first") + _sample("dup", RED, "alpha") + _sample("s1", GREY, "mid")
                       + _sample("dup", BLUE, "beta") + _sample("s2", GREY, "last"))


def test_a_key_repeated_within_a_shard_keeps_the_first_sample_for_image_and_caption(write_shard, tmp_path):
    import torchvision.transforms as T
    from proalign.data.cache import EmbeddingCache
    from proalign.data.shards import ImageTextStream
    shard = str(_dup_shard(write_shard, tmp_path / "dup-000.tar"))
    cache = EmbeddingCache(tmp_path / "cache", "llm", "f" * 16)
    stats = cache.build([shard], lambda texts: torch.tensor([[float(len(t)), float(ord(t[0]))] for t in texts]),
                        progress=False)
    assert stats["duplicate_key"] == 1
    ids, rows, extras = cache.load([shard])
    assert ids == ["s0|en|0", "dup|en|0", "s1|en|0", "s2|en|0"]
    assert extras["shard_samples"] == {str((tmp_path / "dup-000.tar").resolve()): 4}
    stream = ImageTextStream([shard], T.ToTensor(), ["en"], seed=0, shuffle_buffer=1,
                             shard_features=lambda url: cache.rows_by_sample(url))
    epoch = iter(stream)
    items = [next(epoch) for _ in range(4)]  # one epoch: its 4 samples; read-time skips wait in the stream
    dup = next(i for i in items if i["caption_id"] == "dup|en|0")
    assert dup["text"] == "alpha" and dup["image"][0].mean() > 0.9  # the red image with its own caption
    assert torch.equal(dup["features"], rows[ids.index("dup|en|0")])
    assert stream.take_skips() == {"duplicate_key": 1}


def test_a_key_in_two_eval_shards_is_refused_naming_both(write_shard, tmp_path):
    import torchvision.transforms as T
    from proalign.data.shards import DuplicateKeyError, load_image_text
    a = write_shard(tmp_path / "a-000.tar", _sample("k1", RED, "one") + _sample("same", RED, "two"))
    b = write_shard(tmp_path / "b-000.tar", _sample("same", BLUE, "three"))
    with pytest.raises(DuplicateKeyError, match=f"'same' is in two shards of one eval set \\({a} and {b}\\)"):
        load_image_text([str(a), str(b)], T.ToTensor())


def test_member_names_without_a_readable_key_are_counted(write_shard, tmp_path):
    from proalign.data.shards import read_captions
    shard = write_shard(tmp_path / "odd-000.tar", _sample("ok", RED, "fine") + _sample("..x", RED, "lost")
                        + [("k..dots.png", _png(RED))])
    skips = Counter()
    assert [cid for cid, _ in read_captions(str(shard), skips=skips)] == ["ok|en|0"]
    assert skips["odd_member_name"] == 3


def test_captions_a_tokenizer_cannot_take_or_that_show_nothing_are_no_caption_skips(write_shard, tmp_path):
    """A lone surrogate (a JSON escape) used to stop `cache` with a tokenizer traceback; a caption
    of zero-width spaces was trained on."""
    from proalign.data.shards import read_captions
    members = (_sample("ok", RED, "a red square")
               + [("sur.png", _png(RED)), ("sur.json", b'{"captions": {"en": ["bad \\ud800 text"]}}')]
               + _sample("zw", RED, "\u200b\u200b\ufeff ") + _sample("mixed", RED, "fine"))
    members[-1] = ("mixed.json", json.dumps({"captions": {"en": ["\u200b", "kept"]}}).encode())
    shard = write_shard(tmp_path / "text-000.tar", members)
    skips = Counter()
    assert read_captions(str(shard), skips=skips) == [("ok|en|0", "a red square"), ("mixed|en|1", "kept")]
    assert skips["no_caption"] == 2
