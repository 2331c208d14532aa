"""The training stream over shards, and the benchmark's shard builder."""
import json
import subprocess
import sys
from pathlib import Path
import pytest
import torch
from PIL import Image


def _stream_shard(write_shard, tmp_path):
    """A shard with good samples, a corrupt image, a sample without captions and bad JSON."""
    import io
    path = tmp_path / "mixed-000.tar"
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(good, format="JPEG")
    members = []
    for i in range(10):
        members += [(f"s{i:02d}.jpg", good.getvalue()), (f"s{i:02d}.json", json.dumps({"captions": {"en": [f"cap {i}"]}}).encode())]
    members += [("bad.jpg", b"not a jpeg"), ("bad.json", json.dumps({"captions": {"en": ["broken image"]}}).encode()),
                ("empty.jpg", good.getvalue()), ("empty.json", json.dumps({"captions": {"en": ["  "]}}).encode()),
                ("junk.jpg", good.getvalue()), ("junk.json", b"{nope")]
    return write_shard(path, members)


def _build_module(repo_root):
    import importlib.util
    spec = importlib.util.spec_from_file_location("shard_build", repo_root / "data_shards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # runs the demo data generator in a subprocess
@pytest.mark.skipif(not Path("/usr/share/unicode/cldr/common/annotations/en.xml").exists()
                    or not Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").exists(),
                    reason="needs the Debian packages unicode-cldr-core and fonts-noto-color-emoji (.ci/run installs them)")
def test_shard_builder_emoji_split(repo_root, tmp_path):
    proc = subprocess.run([sys.executable, "data_shards/build.py", "--out", str(tmp_path), "--parts", "emoji",
                           "--size", "24"], cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from proalign.data.shards import iter_raw_samples
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    committed = json.loads((repo_root / "data_shards" / "sizes.json").read_text())
    split = {}
    for name in ("emoji-train-000.tar", "emoji-test-000.tar"):
        samples = list(iter_raw_samples(str(tmp_path / name)))
        assert len(samples) == sizes[name]
        assert abs(sizes[name] - committed[name]) <= 0.05 * committed[name]
        split[name] = {s["__key__"]: json.loads(s["json"]) for s in samples}
        assert all(Image.open(__import__("io").BytesIO(s["jpg"])).size == (24, 24) for s in samples[:5])
    assert not set(split["emoji-train-000.tar"]) & set(split["emoji-test-000.tar"])  # split by emoji
    assert all(set(m["captions"]) == {"en"} for m in split["emoji-train-000.tar"].values())
    assert sum(len(m["captions"]) >= 20 for m in split["emoji-test-000.tar"].values()) > 0.9 * len(split["emoji-test-000.tar"])


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_counts_skips_and_resumes_at_the_same_batch(write_shard, tmp_path, workers):
    from proalign.data.shards import ImageTextStream
    from proalign.data.stream import Batcher
    import torchvision.transforms as T
    shard = _stream_shard(write_shard, tmp_path)
    preprocess = T.Compose([T.RandomResizedCrop(4), T.ToTensor()])
    stream = ImageTextStream([str(shard)], preprocess, ["en"], seed=3, shuffle_buffer=4)
    batcher = Batcher(stream, 4, num_workers=workers)
    batches = [batcher.next_batch() for _ in range(6)]
    assert all(b["image"].shape == (4, 3, 4, 4) for b in batches)
    epochs = 24 // 10 + 1
    assert batcher.skips["bad_image"] >= 1 and batcher.skips["no_caption"] >= 1 and batcher.skips["bad_json"] >= 1
    assert batcher.skips["bad_image"] <= epochs
    saved = Batcher(ImageTextStream([str(shard)], preprocess, ["en"], seed=3, shuffle_buffer=4), 4,
                    num_workers=workers)
    for _ in range(3):
        saved.next_batch()
    resumed = Batcher(ImageTextStream([str(shard)], preprocess, ["en"], seed=3, shuffle_buffer=4), 4,
                      num_workers=workers, position=saved.position())
    for expected in batches[3:]:
        got = resumed.next_batch()
        assert got["caption_id"] == expected["caption_id"]
        assert torch.equal(got["image"], expected["image"])  # same augmentation after a resume


def test_concept_split_is_disjoint_complete_and_seeded(repo_root):
    build = _build_module(repo_root)
    concepts = [f"c{i}" for i in range(101)]
    train, test = build.split_concepts(concepts, 0.2, seed=0)
    assert not set(train) & set(test) and set(train) | set(test) == set(concepts) and len(test) == 20
    assert build.split_concepts(list(reversed(concepts)), 0.2, seed=0) == (train, test)  # order-free
    assert build.split_concepts(concepts, 0.2, seed=1)[1] != test
    assert build.fluent_slug("1st place medal") == "1st-place-medal"
    assert build.fluent_slug("man’s shoe") == "mans-shoe" and build.fluent_slug("piñata") == "pinata"


def test_committed_style_shards_keep_the_questions_apart(repo_root):
    """No concept in both train and test-concept; test-style images are only in the held-out style,
    of training concepts; training captions are English only; test captions cover >= 28 languages."""
    from proalign.data.shards import expand_shards, iter_raw_samples
    build = _build_module(repo_root)
    metas = {}
    for split in ("train", "test-style", "test-language", "test-concept"):
        shards = expand_shards(str(repo_root / "data_shards" / f"styles-{split}-*.tar"))
        metas[split] = [json.loads(s["json"]) for url in shards for s in iter_raw_samples(url)]
    concepts = {split: {m["label"] for m in rows} for split, rows in metas.items()}
    assert not concepts["train"] & concepts["test-concept"]
    assert concepts["test-style"] == concepts["train"] == concepts["test-language"]
    assert {m["style"] for m in metas["test-style"]} == {build.HELD_OUT_STYLE}
    assert {m["style"] for m in metas["train"]} == set(build.TRAIN_STYLES)
    assert {m["style"] for m in metas["test-language"] + metas["test-concept"]} == {"noto"}
    assert all(set(m["captions"]) == {"en"} for m in metas["train"])
    for split in ("test-style", "test-language", "test-concept"):
        languages = {lang for m in metas[split] for lang in m["captions"]}
        assert len(languages) >= 28 and languages >= set(build.LANGUAGES)
    assert len(concepts["train"]) + len(concepts["test-concept"]) > 1500
