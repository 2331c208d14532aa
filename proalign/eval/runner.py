"""`proalign eval`: every model file x every dataset -> results.md, rows JSONL and R@1 plots."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config import EvalDatasetConfig, RunConfig
from ..storage import atomic_write_text
from .evaluator import (CLIP_TOWER, EvalSet, Evaluator, clip_text_tower, image_encoder, llm_text_tower,
                        load_eval_set, prompt_text_tower)
from .report import (image_weighted_mean, image_weighted_se, markdown_table, plot_languages, retrieval_sections,
                     with_se, write_rows)

log = logging.getLogger(__name__)


def load_eval_dataset(ds: EvalDatasetConfig, preprocess) -> EvalSet:
    """One configured dataset, in its registered format, decoded."""
    return load_eval_set(ds.name, ds.format, ds.path, preprocess, ds.options, ds.languages, ds.max_samples)


def is_classification(ds: EvalDatasetConfig) -> bool:
    from ..data.datasets import FORMATS
    return FORMATS.get(ds.format, "format").task == "classification"


def load_classification_dataset(ds: EvalDatasetConfig, preprocess):
    """A configured classification dataset, decoded (LabelledImages)."""
    from collections import Counter
    from ..data.datasets import load_classification
    skips: Counter = Counter()
    data = load_classification(ds.format, ds.path, preprocess, ds.options, ds.max_samples, skips)
    if skips:
        log.warning("eval %s: skipped %s", ds.name, dict(skips))
    return data


def shared_llm_features(embedder, batch_size: int) -> Callable[[Sequence[str], Sequence[str]], torch.Tensor]:
    """(ids, texts) -> the embedder's rows of `texts`, each distinct text encoded once and kept:
    every model file evaluated with this embedder reuses them (only its adapter differs)."""
    from ..data.cache import CachedTextFeatures
    by_text = CachedTextFeatures([], torch.empty(0), lambda texts: embedder.encode(texts, batch_size=batch_size),
                                 what="eval text features")
    return lambda ids, texts: by_text(list(texts), list(texts))


def classification_encoders(model, cfg: RunConfig, label: str, with_clip_text: bool, llm_features=None):
    """language -> {tower name: class encoder}: CLIP's text tower and the LLM tower with the
    (ensembled) templates of that language, and the learned CoOp context on the bare names.
    `llm_features` (see `shared_llm_features`): embedder rows shared between models."""
    from .templates import templates_for
    from .zeroshot import ensemble_encoder
    bs = cfg.eval.batch_size

    def llm(texts):
        if llm_features is None:
            return model.encode_text(texts, batch_size=bs)
        with torch.no_grad():
            return model.encode_llm_features(llm_features(texts, texts).to(model.device))

    def encoders_for(lang):
        templates = templates_for(lang, cfg.eval.templates, cfg.eval.template_ensemble)
        out = {}
        if with_clip_text:
            out[CLIP_TOWER] = ensemble_encoder(model.encode_text_clip, templates)
        out[label] = ensemble_encoder(llm, templates)
        if model.prompt is not None and not model.prompt.class_specific:
            out[f"{label} + CoOp"] = lambda names, _index: model.encode_text(names, prompt=True, batch_size=bs)
        return out
    return encoders_for


def run_eval(cfg: RunConfig, progress: bool = True) -> Path:
    from tqdm.auto import tqdm
    from ..models.embedder import TextEmbedder
    from ..models.proclip import ProCLIP
    from .zeroshot import classify_by_language
    from ..data.images import configure
    configure(cfg.data.max_image_pixels, cfg.data.max_image_aspect)
    models = dict(cfg.eval.models) or ({"model": cfg.init_from} if cfg.init_from else {})
    if not models:
        raise ValueError("eval: set eval.models (label -> model file) or init_from")
    if not cfg.eval.datasets:
        raise ValueError("eval: eval.datasets is empty")
    retrieval = [ds for ds in cfg.eval.datasets if not is_classification(ds)]
    classification = [ds for ds in cfg.eval.datasets if is_classification(ds)]
    embedder = TextEmbedder.from_config(cfg.embedder)
    bs = cfg.eval.batch_size
    llm_features = shared_llm_features(embedder, bs)  # the LLM runs once per caption, not once per model
    evaluator, labelled = None, {}
    rows: list[dict] = []
    class_rows: list[dict] = []
    for index, (label, path) in enumerate(tqdm(models.items(), desc="eval", disable=not progress, unit="model")):
        model = ProCLIP.from_config(cfg, embedder=embedder, weights_follow=True).load(path).eval()
        with_clip_text = cfg.eval.clip_text_baseline and index == 0
        if evaluator is None:  # decoded once, with the first model's preprocessing
            evaluator = Evaluator([load_eval_dataset(ds, model.preprocess_eval) for ds in retrieval],
                                  progress=progress)
            labelled = {ds.name: load_classification_dataset(ds, model.preprocess_eval) for ds in classification}
        if retrieval:
            towers = [clip_text_tower(model)] if with_clip_text else []
            towers.append(llm_text_tower(model, label, llm_features))
            if model.prompt is not None:
                towers.append(prompt_text_tower(model, f"{label} + CoOp", batch_size=bs))
            rows += evaluator.evaluate(image_encoder(model), towers)
        for ds in classification:
            data = labelled[ds.name]
            image_emb = model.encode_image(data.images, batch_size=bs, show_progress_bar=progress)
            encoders = classification_encoders(model, cfg, label, with_clip_text, llm_features)
            class_rows += classify_by_language(image_emb, data, encoders, ds.languages or None, ds.name)
    return write_eval_report(rows, Path(cfg.output_dir), class_rows)


CLASSIFICATION_COLUMNS = ["dataset", "model", "language", "classes", "images", "top-1", "top-5",
                          "mean per-class recall", "chance"]


def classification_sections(rows: list[dict], out: Path) -> list[str]:
    """Zero-shot classification: a table (top-1 ± s.e., top-5, mean per-class recall) and a top-1
    plot per dataset by language of the class names."""
    if not rows:
        return []
    table = [{**r, "top-1": with_se(r["top1"], r["top1_se"]), "top-5": f"{r['top5']:.3f}",
              "mean per-class recall": f"{r['mean_per_class_recall']:.3f}", "chance": f"{r['top1_chance']:.4f}"}
             for r in rows]
    parts = ["## Zero-shot classification (by language of the class names; ± 1 s.e.)", "",
             markdown_table(table, CLASSIFICATION_COLUMNS), ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        plot = out / f"{dataset}_top1.png"
        plot_languages([r for r in rows if r["dataset"] == dataset], plot, "top1", f"{dataset}: zero-shot top-1")
        parts += [f"![{dataset}]({plot.name})", ""]
    return parts


def write_eval_report(rows: list[dict], out: Path, class_rows: Optional[list[dict]] = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    class_rows = class_rows or []
    write_rows(rows + class_rows, out / "eval_rows.jsonl")
    parts = ["# proalign eval", "", *classification_sections(class_rows, out)]
    if rows:
        parts += retrieval_sections(rows, out)
        summary = _mean_by(rows)
        plot_path = out / "eval_t2i_r1.png"
        plot_languages([{**r, "language": r["dataset"]} for r in summary], plot_path, "t2i_R@1",
                       "text→image R@1 (mean over languages) per dataset")
        parts += ["## Summary (mean over languages, each weighted by its number of images; ± 1 s.e.)", "",
                  markdown_table([{**r, "t2i_R@1": with_se(r["t2i_R@1"], r["t2i_R@1_se"])} for r in summary],
                                 ["dataset", "model", "t2i_R@1"]), "",
                  f"![summary]({plot_path.name})", ""]
    path = out / "results.md"
    atomic_write_text(path, "\n".join(parts))
    print("\n".join(parts))
    return path


def _mean_by(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    return [{"dataset": d, "model": m, "language": "all", "t2i_R@1": image_weighted_mean(v, "t2i_R@1"),
             "t2i_R@1_se": image_weighted_se(v, "t2i_R@1")} for (d, m), v in groups.items()]
