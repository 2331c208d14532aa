"""`proalign demo`: the whole method on the embedded shards, offline, with timings per step.

teacher (small English CLIP) -> stage 1 (multilingual-e5-small, English captions only) ->
stage 2 -> CoOp head -> per-language emoji retrieval + long-caption retrieval for the CLIP text
tower, after stage 1, after stage 2 and with the CoOp context. Re-running reuses the teacher,
the embedding caches and the stage-1, stage-2 and CoOp model files (delete one to redo that step).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from . import pipeline
from .config import load_config
from .eval.benchmark import evaluate_retrieval
from .eval.report import image_weighted_mean, language_table, markdown_table, plot_languages
from .models.proclip import ProCLIP

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def _cached_text_encoder(model: ProCLIP, cache: dict[str, torch.Tensor]):
    def encode(texts, ids):
        feats = [cache.get(i) for i in ids]
        missing = [k for k, f in enumerate(feats) if f is None]
        if missing:
            fresh = model.embedder.encode([texts[k] for k in missing])
            for k, f in zip(missing, fresh):
                feats[k] = f
        with torch.no_grad():
            return model.encode_llm_features(torch.stack(feats))
    return encode


def _evaluate(model: ProCLIP, cfg, name: str, llm_cache: dict, with_clip_text: bool = False,
              prompt: bool = False) -> list[dict]:
    model.eval()
    encoders, truncation = {}, {}
    if with_clip_text:
        encoders["CLIP text tower"] = lambda texts, ids: model.encode_text_clip(texts)
        truncation["CLIP text tower"] = functools.partial(model.count_truncated, tower="clip")
    if prompt:
        encoders[name] = lambda texts, ids: model.encode_text(texts, prompt=True, batch_size=256)
    else:
        encoders[name] = _cached_text_encoder(model, llm_cache)
    truncation[name] = functools.partial(model.count_truncated, tower="prompt" if prompt else "llm")
    rows = []
    for shard in cfg.data.eval_shards:
        dataset = Path(shard).name.split("-0")[0]
        rows += evaluate_retrieval(lambda x: model.encode_image(x), encoders, [shard], model.preprocess_eval,
                                   None, cfg.data.max_eval_samples, dataset, truncation)
    return rows


def _load_or_run(model: ProCLIP, path: Path, what: str, resume: bool, run) -> None:
    """Re-running the demo reuses a finished step's model file instead of training again."""
    if path.exists() and not resume:
        model.load(path)
        print(f"[demo] reusing {what} {path}")
    else:
        run()


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    """Record the block's wall time in timings[name]."""
    start = time.time()
    yield
    timings[name] = time.time() - start


def run_demo(output_dir: str, config: Optional[str] = None, overrides=None, resume: bool = False,
             progress: bool = True) -> Path:
    out = Path(output_dir)
    cfg = load_config(config or DEFAULT_CONFIG, [f"output_dir={out}", *(overrides or [])])
    timings: dict[str, float] = {}
    total = time.time()

    teacher_path = out / "teacher.safetensors"
    with _timed(timings, "teacher CLIP"):
        if teacher_path.exists() and not resume:
            print(f"[demo] reusing trained teacher {teacher_path}")
        else:
            pipeline.run_teacher(cfg, resume=resume, progress=progress)

    with _timed(timings, "load embedder"):
        cfg1 = load_config(config or DEFAULT_CONFIG, [f"output_dir={out}", f"clip.checkpoint={teacher_path}",
                                                       *(overrides or [])])
        model = ProCLIP.from_config(cfg1)
    with _timed(timings, "embedding cache"):
        pipeline.build_caches(cfg1, model, progress=progress)
    ids, feats, _ = pipeline.llm_cache(cfg1, model).load(cfg1.data.eval_shards)
    eval_cache = dict(zip(ids, feats))

    rows: list[dict] = []
    # (step, model file, what it is, how to train it, eval step, row label, prompt context on)
    stages = [("stage 1", "stage1.safetensors", "stage-1 model", pipeline.run_stage1,
               "eval stage 1", "after stage 1", False),
              ("stage 2", "stage2.safetensors", "stage-2 model", pipeline.run_stage2,
               "eval stage 2", "after stage 2", False),
              ("CoOp head", "coop.safetensors", "CoOp head", pipeline.run_coop,
               "eval CoOp", "+ CoOp context", True)]
    for name, filename, what, run_stage, eval_name, label, prompt in stages:
        with _timed(timings, name):
            _load_or_run(model, out / filename, what, resume,
                         functools.partial(run_stage, cfg1, resume=resume, model=model, progress=progress))
        with _timed(timings, eval_name):  # the CLIP text tower is evaluated once, with the first rows
            rows += _evaluate(model, cfg1, label, eval_cache, with_clip_text=not rows, prompt=prompt)
    timings["total"] = time.time() - total

    _write_report(out, rows, timings)
    return out / "results.md"


def _summary_rows(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        others = [r for r in mine if r["language"] != "en"]
        english = [r for r in mine if r["language"] == "en"]
        for direction in ("t2i", "i2t"):
            row = {"model": model, "direction": direction}
            if english:
                row["R@1 en"] = english[0][f"{direction}_R@1"]
            for k in (1, 5, 10):
                if others:
                    row[f"R@{k} non-en"] = image_weighted_mean(others, f"{direction}_R@{k}")
            out.append(row)
    return out


def _write_report(out: Path, rows: list[dict], timings: dict) -> None:
    with (out / "demo_rows.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    emoji = [r for r in rows if r["dataset"].startswith("emoji")]
    other = [r for r in rows if not r["dataset"].startswith("emoji")]
    parts = ["# proalign demo results", "",
             f"Held-out emoji: {max((r['images'] for r in emoji), default=0)} images; chance R@1 = "
             f"{1 / max(1, max((r['images'] for r in emoji), default=1)):.4f}.", "",
             "Mean over languages (English alone, and the non-English mean, each language weighted by its "
             "number of images):", "",
             markdown_table(_summary_rows(emoji), ["model", "direction", "R@1 en", "R@1 non-en", "R@5 non-en",
                                                   "R@10 non-en"]), "",
             "Zero-shot multilingual emoji retrieval (held-out emoji; CLDR names; every model saw only "
             "English captions in training). Text→image R@1 per language:", "",
             language_table(emoji, "t2i_R@1"), "", "Image→text R@1 per language:", "",
             language_table(emoji, "i2t_R@1"), "", "![per-language R@1](emoji_t2i_r1.png)", ""]
    if other:
        parts += ["Long-caption retrieval (clip-art descriptions):", "",
                  markdown_table(other, ["dataset", "model", "images", "truncated", "t2i_R@1", "t2i_R@5", "t2i_R@10",
                                         "i2t_R@1", "i2t_R@5", "i2t_R@10"]), ""]
    coop = out / "coop_results.md"
    if coop.exists():
        parts += ["CoOp head (learned context on English training emoji, 1 shot each) — zero-shot "
                  "classification of the held-out emoji by language of the class names:", "",
                  coop.read_text().split("\n", 2)[-1], "![CoOp accuracy](coop_accuracy.png)", ""]
    parts += ["Time per step (seconds):", "",
              markdown_table([{"step": k, "seconds": round(v, 1)} for k, v in timings.items()], ["step", "seconds"]), ""]
    (out / "results.md").write_text("\n".join(parts))
    (out / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1) + "\n")
    plot_languages(emoji, out / "emoji_t2i_r1.png", "t2i_R@1", "Emoji retrieval, text→image R@1")
    print("\n".join(parts))
    print(f"[demo] wrote {out / 'results.md'} and {out / 'emoji_t2i_r1.png'}")
