"""Zero-shot classification datasets (imagefolder, coop-split), metrics against hand computations,
template ensembles, few-shot subsets per seed, and the CoOp protocol command."""
import json
import os

import pytest
import torch


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


def test_classification_metrics_match_a_hand_computation():
    from proalign.eval.zeroshot import classification_metrics
    # 6 images, 6 classes; rows are scores, the true class of each image is `labels`
    labels = torch.tensor([0, 0, 1, 1, 2, 5])
    scores = torch.tensor([
        [9, 1, 0, 0, 0, 0],   # class 0: top-1 right
        [1, 9, 0, 0, 0, 0],   # class 0: wrong (1), right at rank 2
        [0, 9, 1, 0, 0, 0],   # class 1: right
        [0.4, 0.3, 0.2, 0.1, 0.05, 0.5],  # class 1: rank 3
        [0, 0, 9, 0, 0, 0],   # class 2: right
        [5, 4, 3, 2, 1, 0],   # class 5: rank 6 -> outside top-5
    ], dtype=torch.float)
    m = classification_metrics(scores, labels)
    assert m["top1"] == pytest.approx(3 / 6)
    # top-5: images 0-4 are in (ranks 1, 2, 1, 3, 1); image 5's class 5 is last of 6 -> out
    assert m["top5"] == pytest.approx(5 / 6)
    # per-class top-1 recall: class 0: 1/2, class 1: 1/2, class 2: 1, class 5: 0 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert m["top1_se"] == pytest.approx((0.5 * 0.5 / 6) ** 0.5)


def test_template_ensemble_equals_the_direct_computation():
    from proalign.eval.zeroshot import ensemble_encoder
    g = torch.Generator().manual_seed(0)
    table = {}

    def encode(texts):
        for t in texts:
            table.setdefault(t, torch.randn(5, generator=g, dtype=torch.float64).float())
        return torch.stack([table[t] for t in texts])
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}!"]
    names = ["cat", "dog"]
    got = ensemble_encoder(encode, templates)(names, None)
    for i, name in enumerate(names):
        rows = torch.stack([table[t.format(name)] for t in templates]).double()
        rows = rows / rows.norm(dim=1, keepdim=True)
        mean = rows.mean(0)
        assert torch.allclose(got[i].double(), mean / mean.norm(), atol=1e-6)


def test_zero_shot_accuracy_per_language_of_the_class_names():
    """classify_by_language on known embeddings: every German name points at its image; the
    Japanese name of class b outscores class a's on a's image."""
    from proalign.data.classification import LabelledImages
    from proalign.eval.zeroshot import classify_by_language
    images = torch.eye(3)
    data = LabelledImages(torch.zeros(3, 3, 2, 2), torch.tensor([0, 1, 2]), ["a", "b", "c"],
                          [{"de": ["A"], "ja": ["ア"]}, {"de": ["B"], "ja": ["イ"]}, {"de": ["C"]}])
    vectors = {"A": [1, 0, 0], "B": [0, 1, 0], "C": [0.1, 0, 1], "ア": [1, 0, 0], "イ": [1.2, 0.1, 0]}

    def encoders_for(lang):
        return {"toy": lambda names, _i: torch.tensor([vectors[n] for n in names], dtype=torch.float)}
    rows = {r["language"]: r for r in classify_by_language(images, data, encoders_for, dataset="toy")}
    assert rows["de"]["top1"] == 1.0 and rows["de"]["classes"] == 3
    # ja: classes a, b only (c has no Japanese name); image a: ア 1.0 < イ 1.2 -> wrong;
    # image b: ア 0.0 < イ 0.1 -> right
    assert rows["ja"]["classes"] == 2 and rows["ja"]["images"] == 2
    assert rows["ja"]["top1"] == 0.5 and rows["ja"]["mean_per_class_recall"] == 0.5 and rows["ja"]["top5"] == 1.0


@pytest.fixture
def model_file(tiny_cfg, tmp_path):
    from proalign.models.proclip import ProCLIP
    torch.manual_seed(0)
    path = tmp_path / "stage2.safetensors"
    ProCLIP.from_config(tiny_cfg).save(path, {"stage": "stage2"})
    return path


def test_eval_reports_zero_shot_classification_on_both_layouts(tiny_cfg, model_file, imagefolder, coop_split, tmp_path):
    from proalign.config import EvalDatasetConfig, _format_options
    from proalign.eval.runner import run_eval
    root, names = imagefolder
    tiny_cfg.eval.models = {"tiny": str(model_file)}
    sets = [EvalDatasetConfig("toy-folder", "imagefolder", str(root), options={"classnames": str(names)}),
            EvalDatasetConfig("toy-coop", "coop-split", str(coop_split), options={"images": "images"})]
    for i, ds in enumerate(sets):
        ds.options = _format_options(ds, f"eval.datasets[{i}]")
    tiny_cfg.eval.datasets = sets
    tiny_cfg.output_dir = str(tmp_path / "eval")
    results = run_eval(tiny_cfg, progress=False).read_text()
    assert "## Zero-shot classification" in results
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "eval_rows.jsonl")]
    folder_rows = [r for r in rows if r["dataset"] == "toy-folder"]
    assert {r["language"] for r in folder_rows} == {"en", "de", "ja"}
    assert {r["model"] for r in folder_rows} == {"CLIP text tower", "tiny"}
    assert all(r["images"] == len(CLASSES) * PER_CLASS and 0 <= r["top1"] <= r["top5"] <= 1 for r in folder_rows)
    coop_rows = [r for r in rows if r["dataset"] == "toy-coop"]
    assert {r["images"] for r in coop_rows} == {len(CLASSES)}  # the test split only
    assert (tmp_path / "eval" / "toy-folder_top1.png").exists()


def _split(root, name):
    from proalign.config import EvalDatasetConfig, _format_options
    ds = EvalDatasetConfig(name, "coop-split", str(root), options={"images": "images", "split": name})
    ds.options = _format_options(ds, "coop")
    return ds


def test_coop_protocol_runs_every_shot_and_seed_then_skips_finished_runs(tiny_cfg, model_file, coop_split,
                                                                       tmp_path, capsys):
    from proalign.stages.coop_protocol import run_protocol
    tiny_cfg.init_from = str(model_file)
    tiny_cfg.output_dir = str(tmp_path / "protocol")
    tiny_cfg.coop.epochs, tiny_cfg.coop.batch_size = 2, 4
    tiny_cfg.coop.eval_languages = ["en"]
    tiny_cfg.coop.train_data, tiny_cfg.coop.eval_data = _split(coop_split, "train"), _split(coop_split, "test")
    tiny_cfg.coop.max_classes = 3  # a fixed random subset of the classes, the same for every seed
    results = run_protocol(tiny_cfg, shots=[1, 2], seeds=[1, 2], progress=False)
    assert sorted((r["shots"], r["seed"]) for r in results) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert {r["parts"]["all"][0]["classes"] for r in results} == {3}
    table = (tmp_path / "protocol" / "coop_protocol.md").read_text()
    assert "| 0 (hand-written prompt) |" in table and "| 2 |" in table and "±" in table
    assert (tmp_path / "protocol" / "coop_protocol.png").exists()
    stamp = os.path.getmtime(tmp_path / "protocol" / "shots-1" / "seed-1" / "result.json")
    capsys.readouterr()
    again = run_protocol(tiny_cfg, shots=[1, 2], seeds=[1, 2], progress=False)
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert again == results
    assert os.path.getmtime(tmp_path / "protocol" / "shots-1" / "seed-1" / "result.json") == stamp


def test_coop_protocol_resumes_an_interrupted_run_from_its_checkpoints(tiny_cfg, model_file, coop_split, tmp_path,
                                                                       monkeypatch):
    """A (shots, seed) run with checkpoints but no result.json (killed mid-way) is resumed, not
    restarted: the engine writes them under `<run>/coop/checkpoints`."""
    import proalign.stages.coop as coop_stage
    from proalign.stages.coop_protocol import run_dir, run_protocol
    tiny_cfg.init_from = str(model_file)
    tiny_cfg.output_dir = str(tmp_path / "protocol")
    tiny_cfg.coop.epochs, tiny_cfg.coop.batch_size = 2, 4
    tiny_cfg.coop.eval_languages = ["en"]
    tiny_cfg.coop.train_data, tiny_cfg.coop.eval_data = _split(coop_split, "train"), _split(coop_split, "test")
    run_protocol(tiny_cfg, shots=[1], seeds=[1], progress=False)
    folder = run_dir(tmp_path / "protocol", 1, 1)
    assert list((folder / "coop" / "checkpoints").glob("step-*"))
    (folder / "result.json").unlink()  # as if killed after its last checkpoint
    resumed = []
    real = coop_stage.run_coop

    def spy(cfg, resume=False, **kwargs):
        resumed.append(resume)
        return real(cfg, resume=resume, **kwargs)
    monkeypatch.setattr(coop_stage, "run_coop", spy)
    run_protocol(tiny_cfg, shots=[1], seeds=[1], progress=False)
    assert resumed == [True] and (folder / "result.json").exists()


def test_coop_base_to_new_reports_both_halves_and_their_harmonic_mean(tiny_cfg, model_file, coop_split, tmp_path):
    from proalign.eval.report import harmonic_mean
    from proalign.stages.coop_protocol import run_protocol
    tiny_cfg.init_from = str(model_file)
    tiny_cfg.output_dir = str(tmp_path / "b2n")
    tiny_cfg.coop.epochs, tiny_cfg.coop.batch_size = 2, 4
    tiny_cfg.coop.eval_languages = ["en"]
    tiny_cfg.coop.train_data, tiny_cfg.coop.eval_data = _split(coop_split, "train"), _split(coop_split, "test")
    results = run_protocol(tiny_cfg, shots=[2], seeds=[1], base_to_new=True, progress=False)
    parts = results[0]["parts"]
    assert parts["base"][0]["classes"] == 2 and parts["new"][0]["classes"] == 2
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3) and harmonic_mean(0.0, 0.0) == 0.0
    assert "Base-to-new" in (tmp_path / "b2n" / "coop_protocol.md").read_text()
