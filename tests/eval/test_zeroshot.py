"""Zero-shot classification: metrics, the template ensemble, accuracy per language, and proalign eval on both layouts."""
import json
import pytest
import torch


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


def test_eval_reports_zero_shot_classification_on_both_layouts(toy_classes, tiny_cfg, model_file, imagefolder, coop_split, tmp_path):
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
    assert all(r["images"] == len(toy_classes.names) * toy_classes.per_class and 0 <= r["top1"] <= r["top5"] <= 1 for r in folder_rows)
    coop_rows = [r for r in rows if r["dataset"] == "toy-coop"]
    assert {r["images"] for r in coop_rows} == {len(toy_classes.names)}  # the test split only
    assert (tmp_path / "eval" / "toy-folder_top1.png").exists()
