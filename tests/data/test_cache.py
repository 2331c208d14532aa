"""The embedding caches: one encode per text, the memo's bound, corrupted sidecars."""
import io
import json
import pytest
import torch
from PIL import Image


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _sidecar_with_flipped_tensor_bytes(path) -> None:
    """Flip bytes in the tensor data of a safetensors file (the header stays valid)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start = 8 + header
    for offset in range(start + 4, min(len(data), start + 64), 7):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_small_languages_weigh_by_their_images_in_every_mean(tmp_path):
    from proalign.eval.report import image_weighted_mean, language_table
    from proalign.eval.runner import write_eval_report
    rows = [{"dataset": "xm", "model": "m", "language": "en", "images": 400, "captions": 400, "t2i_R@1": 0.0},
            {"dataset": "xm", "model": "m", "language": "mi", "images": 5, "captions": 5, "t2i_R@1": 1.0}]
    for r in rows:
        r.update({k: r["t2i_R@1"] for k in ("t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")})
    assert image_weighted_mean(rows, "t2i_R@1") == pytest.approx(5 / 405)
    assert "| **mean (weighted by images)** | 0.012 |" in language_table(rows)
    text = write_eval_report(rows, tmp_path).read_text()
    assert "weighted by its number of images" in text and "| xm | m | 0.012 |" in text


def test_cache_encodes_each_text_once_per_build_and_knows_its_languages(write_shard, tmp_path):
    from proalign.data.cache import EmbeddingCache, StaleCacheError
    multi = [(f"s{i}.jpg", _jpeg()) for i in range(4)]
    metas = [{"captions": {"en": ["cat" if i % 2 else "dog"], "de": ["Katze" if i % 2 else "Hund"]}} for i in range(4)]
    members = [m for i in range(4) for m in (multi[i], (f"s{i}.json", json.dumps(metas[i]).encode()))]
    a = write_shard(tmp_path / "a-000.tar", members)
    b = write_shard(tmp_path / "b-000.tar", members)  # the same texts again, in another shard
    seen = []

    def encode(texts):
        seen.extend(texts)
        return torch.tensor([[float(len(t)), float(sum(map(ord, t)))] for t in texts])
    per_shard = EmbeddingCache(tmp_path / "per-shard", "llm", "e" * 16)
    stats = per_shard.build([str(a), str(b)], encode, ["en"], progress=False, memo_bytes=0)
    assert sorted(seen) == ["cat", "cat", "dog", "dog"] and stats["texts_encoded"] == 4  # memo off: per shard
    seen.clear()
    cache = EmbeddingCache(tmp_path / "cache", "llm", "e" * 16)
    stats = cache.build([str(a), str(b)], encode, ["en"], progress=False)
    # the second shard's texts come from the memo, its sidecar the same as when encoded afresh
    assert sorted(seen) == ["cat", "dog"] and stats["texts_encoded"] == 2 and stats["texts_reused"] == 2
    assert stats["captions_encoded"] == 8
    assert per_shard.sidecar(str(b)).read_bytes() == cache.sidecar(str(b)).read_bytes()
    ids, feats, _ = cache.load([str(a), str(b)], ["en"])
    expected = ["cat" if int(cid.split("|")[0][1:]) % 2 else "dog" for cid in ids]  # ids: s<i>|en|0
    assert torch.equal(feats, encode(expected))
    with pytest.raises(StaleCacheError, match=r"cached for languages \['en'\]"):
        cache.load([str(a)], ["en", "de"])
    cache.build([str(a)], encode, ["en", "de"], progress=False)  # re-encoded for the wider set
    assert len(cache.load([str(a)], ["en", "de"])[0]) == 8


def test_cache_memo_is_bounded_least_recently_used_out_first():
    from proalign.data.cache import _RowMemo
    memo = _RowMemo(max_bytes=3 * 4 * 4)  # three rows of four float32
    batch = torch.arange(16, dtype=torch.float32).view(4, 4)
    for i, text in enumerate("abc"):
        memo.put(text, batch[i])
    assert memo.get("a") is not None  # a is now the most recent
    memo.put("d", batch[3])
    assert memo.get("b") is None and memo.get("a") is not None and memo.get("d") is not None
    assert memo.bytes == 3 * 16 and memo.get("c")._base is None  # rows are copies, not views of the batch
    memo.put("huge", torch.zeros(100))  # larger than the whole memo: not kept
    assert memo.get("huge") is None and memo.bytes == 3 * 16


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated"])
def test_corrupted_cache_sidecar_is_refused_in_training_and_re_encoded_by_cache(write_shard, tmp_path, damage):
    """A sidecar whose tensor bytes changed after it was written (bit rot, a bad copy) or that was
    cut short: reading it for training raises the stale-cache error naming the file; `build`
    (`proalign cache`) re-encodes it to the same rows."""
    from proalign.data.cache import EmbeddingCache, StaleCacheError
    metas = [{"captions": {"en": [f"caption number {i}"]}} for i in range(6)]
    shard = write_shard(tmp_path / "s-000.tar", [m for i in range(6) for m in (
        (f"s{i}.jpg", _jpeg()), (f"s{i}.json", json.dumps(metas[i]).encode()))])
    encode = lambda texts: torch.tensor([[float(len(t)), float(sum(map(ord, t))), 1.0] for t in texts])  # noqa: E731
    cache = EmbeddingCache(tmp_path / "cache", "llm", "fp")
    assert cache.build([str(shard)], encode, progress=False)["shards_encoded"] == 1
    want = cache.shard_rows(str(shard))[1].clone()  # safetensors maps the file: keep a copy
    sidecar = cache.sidecar(str(shard))
    if damage == "flipped_bytes":
        _sidecar_with_flipped_tensor_bytes(sidecar)
    else:
        sidecar.write_bytes(sidecar.read_bytes()[: sidecar.stat().st_size // 2])
    with pytest.raises(StaleCacheError, match=rf"{sidecar.name}.*(corrupted|unreadable)"):
        cache.rows_by_sample(str(shard))
    with pytest.raises(StaleCacheError, match=rf"{sidecar.name}"):
        cache.shard_rows(str(shard))
    again = cache.build([str(shard)], encode, progress=False)
    assert again["shards_encoded"] == 1 and "shards_reused" not in again
    _, got, _ = cache.shard_rows(str(shard))
    assert torch.equal(got, want)


def test_non_finite_rows_are_never_cached_and_a_non_finite_sidecar_is_named(write_shard, tmp_path):
    from safetensors.torch import save_file
    from safetensors import safe_open
    from proalign.data.cache import EmbeddingCache, StaleCacheError, tensor_digest
    from proalign.errors import ProalignError
    members = []
    for i, text in enumerate(["cat", "dog", "fox"]):
        members += [(f"s{i}.jpg", _jpeg()), (f"s{i}.json", json.dumps({"captions": {"en": [text]}}).encode())]
    shard = write_shard(tmp_path / "n-000.tar", members)
    cache = EmbeddingCache(tmp_path / "cache", "llm", "a" * 16)
    nan_for_dog = lambda texts: torch.tensor([[float("nan") if t == "dog" else 1.0, 2.0] for t in texts])  # noqa: E731
    with pytest.raises(ProalignError, match=r"n-000.tar: the llm encoder gave NaN .* caption 's1\|en\|0' \('dog'\)"):
        cache.build([str(shard)], nan_for_dog, progress=False)
    assert not cache.sidecar(str(shard)).exists()
    # a sidecar whose NaN was written with a matching checksum (corrupted at the source)
    cache.build([str(shard)], lambda texts: torch.ones(len(texts), 2), progress=False)
    path = cache.sidecar(str(shard))
    with safe_open(str(path), "pt") as f:
        meta, rows = f.metadata(), f.get_tensor("embeddings")
    rows[2, 0] = float("nan")
    inner = json.loads(meta["proalign_cache"])
    inner["tensor_sha256"] = tensor_digest(rows)
    save_file({"embeddings": rows}, str(path), {"proalign_cache": json.dumps(inner, sort_keys=True)})
    with pytest.raises(StaleCacheError, match=f"not finite \\({path}: row 2 holds NaN"):
        cache.load([str(shard)])
