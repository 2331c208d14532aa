"""Bad shards: unusable, truncated, non-object JSON, unsafe names, edited in place."""
import contextlib
import io
import json
import signal
from collections import Counter
import pytest
import torch
from PIL import Image


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def good_members(n, start=0):
    out = []
    for i in range(start, start + n):
        out += [(f"s{i:03d}.jpg", _jpeg()), (f"s{i:03d}.json", json.dumps({"captions": {"en": [f"cap {i}"]}}).encode())]
    return out


@contextlib.contextmanager
def deadline(seconds):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _batcher(shards, workers=0):
    import torchvision.transforms as T
    from proalign.data.shards import ImageTextStream
    from proalign.data.stream import Batcher
    stream = ImageTextStream([str(s) for s in shards], T.Compose([T.Resize(4), T.ToTensor()]), ["en"], seed=0,
                             shuffle_buffer=4)
    return Batcher(stream, 2, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("case", ["zero_byte", "all_images_corrupt"])
def test_stream_over_unusable_shards_fails_fast_naming_them(write_shard, tmp_path, case, workers):
    from proalign.data.shards import EmptyStreamError
    shard = tmp_path / "bad-000.tar"
    if case == "zero_byte":
        shard.write_bytes(b"")
    else:
        write_shard(shard, [(n.replace(".jpg", ".jpg"), b"not a jpeg" if n.endswith(".jpg") else d)
                            for n, d in good_members(5)])
    with deadline(60), pytest.raises(Exception) as info:
        _batcher([shard], workers).next_batch()
    assert "bad-000.tar" in str(info.value) and "no usable sample in 2 passes" in str(info.value)
    if workers == 0:
        assert isinstance(info.value, EmptyStreamError)
    if case == "all_images_corrupt":
        assert "bad_image" in str(info.value)


def test_truncated_tar_is_a_counted_skip_naming_the_file(write_shard, tmp_path, caplog):
    from proalign.data.shards import read_captions, tar_is_complete
    whole = write_shard(tmp_path / "whole-000.tar", good_members(20))
    data = whole.read_bytes()
    cut = tmp_path / "cut-000.tar"
    cut.write_bytes(data[:len(data) // 2 + 100])  # mid-member
    assert tar_is_complete(str(whole)) and not tar_is_complete(str(cut))
    skips = Counter()
    assert len(read_captions(str(whole), ["en"], skips)) == 20 and not skips
    with caplog.at_level("WARNING"):
        items = read_captions(str(cut), ["en"], skips)
    assert skips["truncated_shard"] == 1
    assert 0 < len(items) < 20
    assert "cut-000.tar: truncated tar" in caplog.text and f"read {len(items)} samples" in caplog.text
    # a tar cut exactly after a member (no end-of-archive marker) counts too
    after_member = tmp_path / "boundary-000.tar"
    after_member.write_bytes(data[:512 * 4])
    assert not tar_is_complete(str(after_member))


def test_json_that_is_not_an_object_is_a_bad_json_skip(write_shard, tmp_path):
    from proalign.data.shards import read_captions
    shard = write_shard(tmp_path / "list-000.tar", good_members(3) + [("odd.jpg", _jpeg()), ("odd.json", b"[1, 2]")])
    skips = Counter()
    assert len(read_captions(str(shard), ["en"], skips)) == 3 and skips["bad_json"] == 1
    batcher = _batcher([shard])
    for _ in range(4):
        batcher.next_batch()
    assert batcher.skips["bad_json"] >= 1


def test_unsafe_member_names_are_counted_and_skipped(write_shard, tmp_path):
    from proalign.data.shards import read_captions
    members = good_members(2) + [("../evil.jpg", _jpeg()),
                                 ("../evil.json", json.dumps({"captions": {"en": ["up"]}}).encode()),
                                 ("/abs/x.jpg", _jpeg()), ("/abs/x.json", json.dumps({"captions": {"en": ["abs"]}}).encode())]
    shard = write_shard(tmp_path / "unsafe-000.tar", members)
    skips = Counter()
    items = read_captions(str(shard), ["en"], skips)
    assert [t for _, t in items] == ["cap 0", "cap 1"] and skips["unsafe_member_name"] == 2


def test_shard_edited_in_place_with_the_same_size_is_re_encoded_and_refused_stale(write_shard, tmp_path):
    from proalign.data.cache import EmbeddingCache, StaleCacheError
    shard = write_shard(tmp_path / "edit-000.tar", good_members(4))
    cache = EmbeddingCache(tmp_path / "cache", "llm", "f" * 16)
    encode = lambda texts: torch.tensor([[float(len(t)), float(t[-1].isdigit())] for t in texts])  # noqa: E731
    assert cache.build([str(shard)], encode, progress=False)["shards_encoded"] == 1
    ids, _, extras = cache.load([str(shard)])
    assert extras["shard_samples"] == {str(shard.resolve()): 4}
    size = shard.stat().st_size
    write_shard(shard, good_members(4, start=5))  # other captions, same byte size
    assert shard.stat().st_size == size
    with pytest.raises(StaleCacheError, match="edit-000.tar is its shard changed"):
        cache.load([str(shard)])
    assert cache.build([str(shard)], encode, progress=False)["shards_encoded"] == 1
    assert cache.load([str(shard)])[0] == [f"s{i:03d}|en|0" for i in range(5, 9)]


@pytest.mark.slow  # a CLI subprocess (imports torch and the towers: ~10 s); CI runs the slow set
def test_stage2_on_a_zero_byte_shard_exits_with_a_clear_error(run_cli, tmp_path):
    shard = tmp_path / "empty-000.tar"
    shard.write_bytes(b"")
    proc = run_cli(["stage2", "--config", "configs/tiny-cpu.yaml", "--no-progress", f"--set=output_dir={tmp_path / 'run'}",
                    f"--set=data.cache_dir={tmp_path / 'cache'}", f"--set=data.train_shards=[{shard}]",
                    "--set=data.eval_shards=[]"], timeout=120)
    assert proc.returncode == 1
    assert f"error: no usable sample in 2 passes over 1 shard(s) ({shard})" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr) < 5000  # no flood of repeated warnings
