"""Dataset readers on fixtures in each published format; errors name the file and line."""
import json
from pathlib import Path
import pytest
import torch
from proalign.data.datasets import DatasetFormatError, load_records, read_dataset


def _xm3600_block(*captions: str) -> dict:
    """One language block as the published captions.jsonl writes it."""
    return {"caption": list(captions), "caption/tokenized": [c.lower() for c in captions],
            "caption/tokenized/lowercase": [c.lower() for c in captions]}


def _xm3600(write_jpg, root: Path) -> Path:
    """Lines shaped like the published Crossmodal-3600 captions.jsonl: `image/key`, `image/locale`
    (a plain string) and one block per language; not every image has every language."""
    rows = [{"image/key": "000411001ff7dd4f", "image/locale": "bn",
             "en": _xm3600_block("a dog on a beach", "a brown dog"), "de": _xm3600_block("ein Hund am Strand")},
            {"image/key": "00055fd6e3b4b6b6", "image/locale": "th",
             "en": _xm3600_block("two cups of tea"), "th": _xm3600_block("ชาสองถ้วย")}]
    (root / "captions.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    for r in rows:
        write_jpg(root / "images" / f"{r['image/key']}.jpg")
    return root


def _sharegpt4v(write_jpg, root: Path) -> Path:
    rows = [{"id": f"sa_{i}", "image": f"sam/images/sa_{i}.jpg",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                               {"from": "gpt", "value": f"A detailed caption number {i}."}]} for i in range(3)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "share-captioner.json").write_text(json.dumps(rows))
    for r in rows:
        write_jpg(root / r["image"])
    return root / "share-captioner.json"


def _docci(write_jpg, root: Path) -> Path:
    rows = [{"example_id": "test_00000", "split": "test", "image_file": "test_00000.jpg", "description": "A cat."},
            {"example_id": "train_00000", "split": "train", "image_file": "train_00000.jpg", "description": "A dog."},
            {"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg", "description": "A bird."}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for r in rows:
        write_jpg(root / "images" / r["image_file"])
    return root


def _dci(write_jpg, root: Path) -> Path:
    for i in range(2):
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"sa_{i}.json").write_text(json.dumps(
            {"image": f"sa_{i}.jpg", "short_caption": f"Short {i}.", "extra_caption": f"Much longer text {i}.",
             "mask_data": {}}))
        write_jpg(root / "photos" / f"sa_{i}.jpg")
    return root


def _jsonl(write_jpg, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"image": "a.jpg", "captions": {"en": ["apple"], "sw": ["tufaha"]}},
            {"image": "b.jpg", "caption": "banana", "language": "en", "key": "b"}]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    write_jpg(root / "a.jpg")
    write_jpg(root / "b.jpg")
    return root / "data.jsonl"


def test_xm3600_reader(write_jpg, tmp_path):
    records = read_dataset("xm3600", _xm3600(write_jpg, tmp_path / "xm"))
    assert [r.key for r in records] == ["000411001ff7dd4f", "00055fd6e3b4b6b6"]
    assert records[0].captions == {"en": ["a dog on a beach", "a brown dog"], "de": ["ein Hund am Strand"]}
    assert records[1].captions["th"] == ["ชาสองถ้วย"]
    only_de = read_dataset("xm3600", tmp_path / "xm", languages=["de"])
    assert only_de[0].captions == {"de": ["ein Hund am Strand"]} and only_de[1].captions == {}
    assert all(not lang.startswith("image/") for r in records for lang in r.captions)


def test_xm3600_language_block_without_caption_list_is_named(write_jpg, tmp_path):
    root = _xm3600(write_jpg, tmp_path / "xm")
    row = {"image/key": "000411001ff7dd4f", "image/locale": "bn", "fr": {"caption/tokenized": ["un chien"]}}
    (root / "captions.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DatasetFormatError, match=r"captions.jsonl:1: language 'fr' should hold"):
        read_dataset("xm3600", root)


def test_urban1k_sharegpt4v_docci_dci_jsonl_readers(write_jpg, urban1k, tmp_path):
    urban = read_dataset("urban1k", urban1k(tmp_path / "Urban1k"))
    assert [(r.key, r.captions["en"][0]) for r in urban] == [("1", "A long street scene with a red tram."),
                                                             ("2", "A square with many pigeons.")]
    share = read_dataset("sharegpt4v", _sharegpt4v(write_jpg, tmp_path / "sg"), limit=2)
    assert [r.captions["en"][0] for r in share] == ["A detailed caption number 0.", "A detailed caption number 1."]
    docci = read_dataset("docci", _docci(write_jpg, tmp_path / "docci"))
    assert [r.key for r in docci] == ["test_00000", "test_00001"]
    assert [r.key for r in read_dataset("docci", tmp_path / "docci", split="train")] == ["train_00000"]
    dci = read_dataset("dci", _dci(write_jpg, tmp_path / "dci"))
    assert dci[1].captions == {"en": ["Short 1. Much longer text 1."]}
    generic = read_dataset("jsonl", _jsonl(write_jpg, tmp_path / "gen"))
    assert generic[0].captions == {"en": ["apple"], "sw": ["tufaha"]} and generic[1].key == "b"
    images, keys, metas = load_records(generic, lambda im: torch.zeros(3, 4, 4))
    assert images.shape == (2, 3, 4, 4) and metas["b"]["captions"] == {"en": ["banana"]}


def test_malformed_records_name_file_and_line(write_jpg, tmp_path):
    root = _xm3600(write_jpg, tmp_path / "xm")
    lines = (root / "captions.jsonl").read_text().splitlines()
    (root / "captions.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DatasetFormatError, match=r"captions.jsonl:2: not valid JSON"):
        read_dataset("xm3600", root)
    (root / "captions.jsonl").write_text(lines[0] + "\n" + json.dumps({"en": {"caption": ["x"]}}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"captions.jsonl:2: missing field 'image/key'"):
        read_dataset("xm3600", root)
    docci = _docci(write_jpg, tmp_path / "docci")
    (docci / "docci_descriptions.jsonlines").write_text(json.dumps(
        {"example_id": "test_1", "split": "test", "image_file": "test_00000.jpg", "description": 3}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"jsonlines:1: field 'description' should be str"):
        read_dataset("docci", docci)
    gen = _jsonl(write_jpg, tmp_path / "gen")
    gen.write_text(json.dumps({"image": "missing.jpg", "caption": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"data.jsonl:1: image .*missing.jpg not found"):
        read_dataset("jsonl", gen)


@pytest.mark.parametrize("name", ["../outside.jpg", "sub/../../outside.jpg", "/etc/outside.jpg", ""])
def test_eval_images_named_outside_their_dataset_root_are_refused(write_jpg, tmp_path, name):
    """A dataset file names images relative to its root: `..` and absolute paths (which would read
    any file on the machine) and empty names are refused naming file and line, even when the file
    exists."""
    from PIL import Image
    (tmp_path / "outside.jpg").parent.mkdir(exist_ok=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.jpg")
    gen = _jsonl(write_jpg, tmp_path / "gen" / "deep")
    gen.write_text(json.dumps({"image": name, "caption": "x"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"data.jsonl:1: image name .* must be a relative path inside"):
        read_dataset("jsonl", gen)
    if not name:
        return  # XM3600 names `<key>.jpg`: an empty key is the file `.jpg`, inside the root
    root = _xm3600(write_jpg, tmp_path / "xm")
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


def test_corrupt_image_is_counted_not_fatal(urban1k, tmp_path):
    from collections import Counter
    records = read_dataset("urban1k", urban1k(tmp_path / "u"))
    records[0].image_path.write_bytes(b"not a jpeg")
    skips = Counter()
    images, keys, _ = load_records(records, lambda im: torch.zeros(3, 2, 2), skips=skips)
    assert keys == ["2"] and skips["bad_image"] == 1
