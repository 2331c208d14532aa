"""Classification sets on disk (imagefolder, coop-split), class names per language, few-shot subsets."""
import json
import pytest


def test_imagefolder_reads_classes_and_names_per_language(toy_classes, imagefolder):
    from proalign.data.classification import read_imagefolder
    root, names = imagefolder
    records = read_imagefolder(root, classnames=str(names))
    assert records.classes == toy_classes.names and len(records.items) == len(toy_classes.names) * toy_classes.per_class
    assert records.names[1] == {"en": ["red fox"], "de": ["Rotfuchs"], "ja": ["アカギツネ"]}
    assert {label for _, label in records.items} == set(range(len(toy_classes.names)))


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


def test_few_shot_subsets_are_stable_per_seed_and_differ_across_seeds(toy_classes, imagefolder):
    from proalign.data.classification import few_shot, read_imagefolder
    records = read_imagefolder(imagefolder[0])
    one = [p for p, _ in few_shot(records, 2, seed=1).items]
    assert one == [p for p, _ in few_shot(records, 2, seed=1).items]
    assert one != [p for p, _ in few_shot(records, 2, seed=2).items]
    counts = {}
    for _, label in few_shot(records, 2, seed=3).items:
        counts[label] = counts.get(label, 0) + 1
    assert counts == {i: 2 for i in range(len(toy_classes.names))}
    assert len(few_shot(records, 99, seed=1).items) == len(records.items)  # small classes: all of theirs
