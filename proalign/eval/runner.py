"""`proalign eval`: every model file x every dataset -> results.md, rows JSONL and R@1 plots."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import EvalDatasetConfig, RunConfig
from .evaluator import (EvalSet, Evaluator, clip_text_tower, image_encoder, llm_text_tower, load_eval_set,
                        prompt_text_tower)
from .report import (image_weighted_mean, image_weighted_se, markdown_table, plot_languages, retrieval_sections,
                     with_se, write_rows)

log = logging.getLogger(__name__)


def load_eval_dataset(ds: EvalDatasetConfig, preprocess) -> EvalSet:
    """One configured dataset, in its registered format, decoded."""
    return load_eval_set(ds.name, ds.format, ds.path, preprocess, ds.options, ds.languages, ds.max_samples)


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
    evaluator = None
    rows: list[dict] = []
    for index, (label, path) in enumerate(tqdm(models.items(), desc="eval", disable=not progress, unit="model")):
        model = ProCLIP.from_config(cfg, embedder=embedder).load(path).eval()
        if evaluator is None:  # decoded once, with the first model's preprocessing
            evaluator = Evaluator([load_eval_dataset(ds, model.preprocess_eval) for ds in cfg.eval.datasets],
                                  progress=progress)
        towers = [clip_text_tower(model)] if cfg.eval.clip_text_baseline and index == 0 else []
        towers.append(llm_text_tower(model, label, batch_size=bs))
        if model.prompt is not None:
            towers.append(prompt_text_tower(model, f"{label} + CoOp", batch_size=bs))
        rows += evaluator.evaluate(image_encoder(model), towers)
    return write_eval_report(rows, Path(cfg.output_dir))


def write_eval_report(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "eval_rows.jsonl")
    parts = ["# proalign eval", "", *retrieval_sections(rows, out)]
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
