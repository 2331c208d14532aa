"""Classification sets on disk (imagefolder, coop-split), class names per language, few-shot subsets."""
import json
import pytest


CLASSES = ["golden_retriever", "red_fox", "tabby_cat", "zebra"]


COLOURS = {"golden_retriever": (200, 160, 60), "red_fox": (200, 60, 30), "tabby_cat": (120, 120, 120),
           "zebra": (20, 20, 20)}


PER_CLASS = 4


def _image(path, colour, shade):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 36), tuple(min(255, c + 10 * shade) for c in colour)).save(path)


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "folder"
    for cls in CLASSES:
        for i in range(PER_CLASS):
            _image(root / cls / f"{i}.png", COLOURS[cls], i)
    names = tmp_path / "classnames"
    names.mkdir()
    (names / "de.txt").write_text("golden_retriever Golden Retriever\nred_fox Rotfuchs\ntabby_cat Tigerkatze\n"
                                  "zebra Zebra\n", encoding="utf-8")
    (names / "ja.json").write_text(json.dumps(["ゴールデンレトリバー", "アカギツネ", "トラ猫", "シマウマ"]), encoding="utf-8")
    return root, names


@pytest.fixture
def coop_split(tmp_path):
    root = tmp_path / "coopdata"
    entries = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(CLASSES):
        for i in range(PER_CLASS):
            rel = f"{cls}/{i}.png"
            _image(root / "images" / rel, COLOURS[cls], i)
            entries["train" if i < 2 else "val" if i == 2 else "test"].append([rel, label + 10, cls])
    (root / "split_zhou_Toy.json").write_text(json.dumps(entries))
    return root


def test_imagefolder_reads_classes_and_names_per_language(imagefolder):
    from proalign.data.classification import read_imagefolder
    root, names = imagefolder
    records = read_imagefolder(root, classnames=str(names))
    assert records.classes == CLASSES and len(records.items) == len(CLASSES) * PER_CLASS
    assert records.names[1] == {"en": ["red fox"], "de": ["Rotfuchs"], "ja": ["アカギツネ"]}
    assert {label for _, label in records.items} == set(range(len(CLASSES)))


def test_coop_split_reads_its_split_with_labels_and_names(coop_split):
    from proalign.data.classification import read_coop_split
    test = read_coop_split(coop_split, split="test", images="images")
    train = read_coop_split(coop_split, split="train", images="images")
    assert test.classes == ["10", "11", "12", "13"] and train.classes == test.classes
    assert [label for _, label in test.items] == [0, 1, 2, 3] and len(train.items) == 8
    assert test.names[2] == {"en": ["tabby cat"]}
    assert all(path.is_file() for path, _ in test.items)


def test_coop_split_errors_name_the_file_and_entry(coop_split):
    from proalign.data.classification import read_coop_split
    from proalign.data.formats import DatasetFormatError
    split = json.loads((coop_split / "split_zhou_Toy.json").read_text())
    split["test"][1] = ["red_fox/3.png", "eleven", "red_fox"]
    (coop_split / "split_zhou_Toy.json").write_text(json.dumps(split))
    with pytest.raises(DatasetFormatError, match=r"split_zhou_Toy.json: test\[1\]: expected \[image path, integer"):
        read_coop_split(coop_split, images="images")
    with pytest.raises(DatasetFormatError, match="no 'holdout' split"):
        split["test"][1] = ["red_fox/3.png", 11, "red_fox"]
        (coop_split / "split_zhou_Toy.json").write_text(json.dumps(split))
        read_coop_split(coop_split, split="holdout", images="images")


def test_classnames_file_with_wrong_line_count_is_named(imagefolder, tmp_path):
    from proalign.data.classification import read_imagefolder
    from proalign.data.formats import DatasetFormatError
    root, _ = imagefolder
    bad = tmp_path / "fr.txt"
    bad.write_text("renard\nchat\n")
    with pytest.raises(DatasetFormatError, match=r"fr.txt: 2 lines for 4 classes"):
        read_imagefolder(root, classnames=str(bad))


def test_few_shot_subsets_are_stable_per_seed_and_differ_across_seeds(imagefolder):
    from proalign.data.classification import few_shot, read_imagefolder
    records = read_imagefolder(imagefolder[0])
    one = [p for p, _ in few_shot(records, 2, seed=1).items]
    assert one == [p for p, _ in few_shot(records, 2, seed=1).items]
    assert one != [p for p, _ in few_shot(records, 2, seed=2).items]
    counts = {}
    for _, label in few_shot(records, 2, seed=3).items:
        counts[label] = counts.get(label, 0) + 1
    assert counts == {i: 2 for i in range(len(CLASSES))}
    assert len(few_shot(records, 99, seed=1).items) == len(records.items)  # small classes: all of theirs
