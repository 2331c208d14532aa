"""`proalign eval`: every model file x every dataset -> results.md, rows JSONL and R@1 plots."""
from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from pathlib import Path

import torch

from ..config import EvalDatasetConfig, RunConfig
from .benchmark import evaluate_loaded
from .report import image_weighted_mean, image_weighted_se, language_table, markdown_table, plot_languages, with_se

log = logging.getLogger(__name__)


def load_eval_dataset(ds: EvalDatasetConfig, preprocess):
    """(images, keys, metas) for one configured dataset."""
    from ..data.readers import load_records, read_dataset
    from ..data.shards import expand_shards, load_image_text
    skips: Counter = Counter()
    if ds.format == "shards":
        loaded = load_image_text(expand_shards(ds.path), preprocess, max_samples=ds.max_samples, skips=skips)
    else:
        options = {"sharegpt4v": {"images": ds.images, "limit": ds.limit}, "docci": {"split": ds.split},
                   "xm3600": {"languages": ds.languages or None}}.get(ds.format, {})
        records = read_dataset(ds.format, ds.path, **options)
        loaded = load_records(records, preprocess, ds.max_samples, skips)
    if skips:
        log.warning("eval %s: skipped %s", ds.name, dict(skips))
    if not loaded[1]:
        raise ValueError(f"eval dataset {ds.name!r}: no readable images in {ds.path}")
    return loaded


def run_eval(cfg: RunConfig, progress: bool = True) -> Path:
    from tqdm.auto import tqdm
    from ..models.embedder import TextEmbedder
    from ..models.proclip import ProCLIP
    models = dict(cfg.eval.models) or ({"model": cfg.init_from} if cfg.init_from else {})
    if not models:
        raise ValueError("eval: set eval.models (label -> model file) or init_from")
    if not cfg.eval.datasets:
        raise ValueError("eval: eval.datasets is empty")
    embedder = TextEmbedder.from_config(cfg.embedder)
    bs = cfg.eval.batch_size
    rows: list[dict] = []
    jobs = [(label, path, ds) for label, path in models.items() for ds in cfg.eval.datasets]
    loaded_sets: dict[str, tuple] = {}
    for index, (label, path, ds) in enumerate(tqdm(jobs, desc="eval", disable=not progress, unit="job")):
        model = ProCLIP.from_config(cfg, embedder=embedder).load(path).eval()
        if ds.name not in loaded_sets:
            loaded_sets[ds.name] = load_eval_dataset(ds, model.preprocess_eval)
        images, keys, metas = loaded_sets[ds.name]
        encoders, truncation = {}, {}
        if cfg.eval.clip_text_baseline and index < len(cfg.eval.datasets):  # once, from the first model
            encoders["CLIP text tower"] = lambda texts, ids, m=model: m.encode_text_clip(texts)
            truncation["CLIP text tower"] = functools.partial(model.count_truncated, tower="clip")
        encoders[label] = lambda texts, ids, m=model: m.encode_text(texts, batch_size=bs)
        truncation[label] = functools.partial(model.count_truncated, tower="llm")
        if model.prompt is not None:
            encoders[f"{label} + CoOp"] = lambda texts, ids, m=model: m.encode_text(texts, prompt=True, batch_size=bs)
            truncation[f"{label} + CoOp"] = functools.partial(model.count_truncated, tower="prompt")
        device = next(model.clip.parameters()).device
        rows += evaluate_loaded(lambda x, m=model: m.encode_image(x.to(device)), encoders, images, keys, metas,
                                ds.languages or None, ds.name, truncation)
    return write_eval_report(rows, Path(cfg.output_dir))


RECALL_COLUMNS = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"]


def recall_cells(row: dict) -> dict:
    """The row with each recall written as `value ± s.e.`, plus its t2i R@1 chance level."""
    cells = {**row, **{c: with_se(row[c], row.get(f"{c}_se")) for c in RECALL_COLUMNS if c in row}}
    if "t2i_R@1_chance" in row:
        cells["chance t2i R@1"] = f"{row['t2i_R@1_chance']:.4f}"
    return cells


def truncation_rows(rows: list[dict]) -> list[dict]:
    """Per dataset and text tower: captions seen and captions cut at the tower's length limit."""
    totals: dict[tuple, dict] = {}
    for r in rows:
        if "truncated" in r:
            entry = totals.setdefault((r["dataset"], r["model"]), {"dataset": r["dataset"], "model": r["model"],
                                                                   "captions": 0, "truncated": 0})
            entry["captions"] += r["captions"]
            entry["truncated"] += r["truncated"]
    return list(totals.values())


def write_eval_report(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "eval_rows.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    parts = ["# proalign eval", ""]
    detail = ["model", "language", "images", "captions", "truncated", *RECALL_COLUMNS, "chance t2i R@1"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        languages = {r["language"] for r in subset}
        parts += [f"## {dataset}", ""]
        if len(languages) > 1:
            plot = out / f"{dataset}_t2i_r1.png"
            plot_languages(subset, plot, "t2i_R@1", f"{dataset}: text→image R@1 per language")
            parts += ["Text→image R@1:", "", language_table(subset, "t2i_R@1"), "",
                      "Image→text R@1:", "", language_table(subset, "i2t_R@1"), "", f"![{dataset}]({plot.name})", "",
                      "Per language: R@1/5/10 both ways, images and captions in that language, and captions "
                      "cut at the text tower's length limit:", ""]
        parts += [markdown_table([recall_cells(r) for r in subset], detail), ""]
    cut = truncation_rows(rows)
    if cut:
        parts += ["## Truncated captions", "", "Captions longer than the text tower's limit (CLIP: its context "
                  "length; LLM embedder: `embedder.max_length`; CoOp: that minus the context) are cut:", "",
                  markdown_table(cut, ["dataset", "model", "captions", "truncated"]), ""]
    summary = _mean_by(rows)
    plot_path = out / "eval_t2i_r1.png"
    plot_languages([{**r, "language": r["dataset"]} for r in summary], plot_path, "t2i_R@1",
                   "text→image R@1 (mean over languages) per dataset")
    parts += ["## Summary (mean over languages, each weighted by its number of images; ± 1 s.e.)", "",
              markdown_table([{**r, "t2i_R@1": with_se(r["t2i_R@1"], r["t2i_R@1_se"])} for r in summary],
                             ["dataset", "model", "t2i_R@1"]), "",
              f"![summary]({plot_path.name})", ""]
    path = out / "results.md"
    path.write_text("\n".join(parts))
    print("\n".join(parts))
    return path


def _mean_by(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    return [{"dataset": d, "model": m, "language": "all", "t2i_R@1": image_weighted_mean(v, "t2i_R@1"),
             "t2i_R@1_se": image_weighted_se(v, "t2i_R@1")} for (d, m), v in groups.items()]
