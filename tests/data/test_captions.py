"""The shard layouts users already have (`data.captions`): img2dataset's (jpg + txt + json) with no
caption config, and DreamLIP-style multi-caption JSON with roles; each trains stage 1 and stage 2
with no conversion step. Caption fields are part of the cache's key; bad fields are counted skips."""
import json

import pytest

from proalign.config import ConfigError
from proalign.data.captions import CaptionSpec, caption_items, caption_role
from proalign.data.shards import iter_raw_samples, read_captions

SAMPLES = 80


def _emoji_samples(repo_root, count=SAMPLES):
    """(key, jpg bytes, English name) of the first emoji training samples."""
    out = []
    for sample in iter_raw_samples(str(repo_root / "data_shards" / "emoji-train-000.tar")):
        image = next(sample[e] for e in ("png", "jpg", "jpeg", "webp") if e in sample)
        name = json.loads(sample["json"])["captions"]["en"][0]
        out.append((sample["__key__"], image, name, next(e for e in ("png", "jpg", "jpeg", "webp") if e in sample)))
        if len(out) == count:
            break
    return out


@pytest.fixture
def img2dataset_shard(repo_root, write_shard, tmp_path):
    """img2dataset's output: `<key>.jpg`, `<key>.txt` (the caption), `<key>.json` (its metadata)."""
    members = []
    for n, (key, image, name, ext) in enumerate(_emoji_samples(repo_root)):
        key = f"{n:09d}"
        meta = {"url": f"https://example.org/{n}.png", "key": key, "status": "success", "caption": name,
                "width": 32, "height": 32}
        members += [(f"{key}.{ext}", image), (f"{key}.txt", name.encode()), (f"{key}.json", json.dumps(meta).encode())]
    return str(write_shard(tmp_path / "img2dataset-00000.tar", members))


@pytest.fixture
def dreamlip_shard(repo_root, write_shard, tmp_path):
    """Multi-caption JSON: the raw alt-text plus short and long re-captions (DreamLIP's fields)."""
    members = []
    for n, (key, image, name, ext) in enumerate(_emoji_samples(repo_root)):
        meta = {"caption": f"IMG_{n:04d} {name} free download",
                "shortIB_captions": [f"an emoji of {name}", f"{name}, a small drawing"],
                "longIB_captions": [f"A flat, brightly coloured emoji drawing that shows {name} on a plain background."]}
        if n == 3:
            meta.pop("shortIB_captions")  # a sample without the short view
        members += [(f"{key}.{ext}", image), (f"{key}.json", json.dumps(meta).encode())]
    return str(write_shard(tmp_path / "dreamlip-00000.tar", members))


DREAMLIP_FIELDS = [{"field": "shortIB_captions", "role": "short"}, {"field": "longIB_captions", "role": "long"},
                   {"field": "caption", "role": "raw"}]


def test_img2dataset_layout_reads_the_txt_caption_with_no_config(img2dataset_shard):
    items = read_captions(img2dataset_shard)
    assert len(items) == SAMPLES and items[0][0] == "000000000|en|0"
    first = next(iter_raw_samples(img2dataset_shard))
    assert items[0][1] == first["txt"].decode()


def test_multi_caption_fields_carry_language_and_role(dreamlip_shard):
    from collections import Counter
    skips = Counter()
    items = dict(read_captions(dreamlip_shard, skips=skips, captions=CaptionSpec(DREAMLIP_FIELDS)))
    key = next(iter(items)).split("|")[0]
    ids = sorted(cid for cid in items if cid.startswith(key + "|"))
    assert ids == [f"{key}|en|0", f"{key}|en|1", f"{key}|en|long0", f"{key}|en|raw0"]
    assert [caption_role(cid) for cid in ids] == ["short", "short", "long", "raw"]
    assert items[f"{key}|en|raw0"].startswith("IMG_0000")
    # a nested field by dotted path, and a sample lacking every configured field: a counted skip
    nested = {"captions": {"en": ["x"]}, "meta": {"alt": "an alt text"}}
    spec = CaptionSpec([{"field": "meta.alt", "language": "de", "role": "raw"}])
    assert caption_items(spec.read({"__key__": "k", "json": json.dumps(nested).encode()}, "t"), "k") == \
        [("k|de|raw0", "an alt text")]
    missing = CaptionSpec([{"field": "no_such_field"}])
    assert read_captions(dreamlip_shard, skips=skips, captions=missing) == [] and skips["no_caption"] == SAMPLES


def test_bad_caption_fields_are_config_errors_naming_the_field(tiny_cfg):
    from proalign.config import config_from_dict, config_to_dict
    raw = config_to_dict(tiny_cfg)
    raw["data"]["captions"] = [{"field": "caption", "role": "noise"}]
    with pytest.raises(ConfigError, match=r"data.captions\[0\].role: must be one of \['short', 'long', 'raw'\]"):
        config_from_dict(raw)
    raw["data"]["captions"] = [{"field": "caption"}]
    raw["stage1"]["views"] = ["short", "noise"]
    with pytest.raises(ConfigError, match=r"stage1.views: roles are"):
        config_from_dict(raw)


def test_changing_the_caption_fields_makes_the_cache_stale(tiny_cfg, dreamlip_shard, tmp_path):
    from proalign.data.cache import EmbeddingCache
    import torch
    encode = lambda texts: torch.ones(len(texts), 4)  # noqa: E731
    EmbeddingCache(tmp_path, "llm", "f", captions=CaptionSpec(DREAMLIP_FIELDS)).build([dreamlip_shard], encode)
    assert EmbeddingCache(tmp_path, "llm", "f", captions=CaptionSpec(DREAMLIP_FIELDS))._check(dreamlip_shard) is None
    other = EmbeddingCache(tmp_path, "llm", "f", captions=CaptionSpec(DREAMLIP_FIELDS[:1]))
    assert "data.captions changed" in other._check(dreamlip_shard)


@pytest.mark.parametrize("layout", ["img2dataset", "dreamlip"])
def test_users_shards_train_stage1_and_stage2_with_no_conversion(layout, img2dataset_shard, dreamlip_shard,
                                                                 tiny_cfg, tmp_path):
    from proalign.stages.stage1 import run_stage1
    from proalign.stages.stage2 import run_stage2
    shard = img2dataset_shard if layout == "img2dataset" else dreamlip_shard
    tiny_cfg.data.train_shards, tiny_cfg.data.eval_shards = [shard], []
    tiny_cfg.data.cache_dir = str(tmp_path / "cache")
    if layout == "dreamlip":
        tiny_cfg.data.captions = CaptionSpec(DREAMLIP_FIELDS).fields
        tiny_cfg.stage1.views = ["short", "raw"]  # the reference's two views
    tiny_cfg.stage1.train.steps, tiny_cfg.stage2.train.steps = 6, 3  # stage 1 sees every sample (the skips)
    tiny_cfg.stage1.train.batch_size = tiny_cfg.stage2.train.batch_size = 16
    s1 = run_stage1(tiny_cfg, progress=False)
    assert s1["loss"] > 0 and s1["train_captions"] == (SAMPLES if layout == "img2dataset" else 4 * SAMPLES - 2)
    if layout == "dreamlip":
        assert s1["skipped_no_short_caption"] >= 1  # the sample without short captions
    tiny_cfg.init_from = str(tmp_path / "run" / "stage1.safetensors")
    s2 = run_stage2(tiny_cfg, progress=False)
    assert s2["loss_contrastive"] > 0


def test_caption_ids_have_one_format_and_one_parse_even_for_keys_holding_the_separator():
    from proalign.data.captions import CaptionId, caption_items
    cid = CaptionId.of("shop|a/001", "de", "long", 2)
    assert str(cid) == "shop|a/001|de|long2"
    assert CaptionId.parse(str(cid)) == cid and cid.role == "long"
    assert CaptionId.parse("k|en|0").role == "short"
    with pytest.raises(ValueError, match="separator"):
        CaptionId.of("k", "e|n", "short", 0)
    with pytest.raises(ValueError, match="not a caption id"):
        CaptionId.parse("no-separators")
    items = caption_items({"captions": {"en": ["a dog"], "x|y": ["lost"]}}, "k|1", None)
    assert items == [("k|1|en|0", "a dog")]  # the language that cannot be written is left out, said in the log
