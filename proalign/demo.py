"""`proalign demo`: the whole method on the embedded multi-style emoji benchmark, offline, with
error bars and a verdict per claim.

teacher (small English CLIP) -> stage 1 (multilingual-e5-small, English captions only) -> stage 2
-> CoOp head, evaluated on (data_shards/README.md):
- the text-only measure: a concept's name in language L against the teacher's English names;
- test-language: the training drawings, named in 28 languages (the text side alone);
- test-style: the training concepts drawn by Twemoji, a style never trained on;
- test-concept: held-out concepts;
- long captions: the test-language images captioned with their names in every language, English
  last, so CLIP's 77-token text tower cuts the part it can read.
Re-running reuses the teacher, the embedding caches and the stage model files (delete one to redo it).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from . import pipeline
from .config import RunConfig, load_config
from .data.shards import expand_shards, load_image_text
from .eval.benchmark import evaluate_loaded
from .eval.report import (image_weighted_mean, image_weighted_se, language_table, markdown_table,
                          plot_languages, with_se)
from .eval.text_transfer import text_transfer_rows
from .models.proclip import ProCLIP

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
CLIP_TOWER = "CLIP text tower"
LONG = "long"
# The long caption: every language's name of the concept, English last (CLIP cuts it off).
SEPARATOR = " / "
SIGMAS = 3.0
# Images in the long-caption test (each caption runs through the embedder live, per model).
LONG_CAPTION_IMAGES = 500


def dataset_name(shard: str) -> str:
    """`data_shards/styles-test-style-001.tar` -> `styles-test-style`."""
    return Path(shard).name.rsplit("-", 1)[0]


def long_caption_metas(metas: dict) -> dict:
    """Each sample's names in every language joined into one caption, English last."""
    out = {}
    for key, meta in metas.items():
        caps = meta["captions"]
        others = [caps[lang][0] for lang in sorted(caps) if lang != "en" and caps[lang]]
        if caps.get("en"):
            out[key] = {"captions": {LONG: [SEPARATOR.join(others + [caps["en"][0]])]}}
    return out


def gap_in_se(a: float, a_se: float, b: float, b_se: float) -> float:
    """(a - b) in standard errors of the difference (independent samples: a conservative
    approximation for paired ones)."""
    se = (a_se ** 2 + b_se ** 2) ** 0.5
    return (a - b) / se if se > 0 else float("inf") if a != b else 0.0


def _cached_text_encoder(model: ProCLIP, cache: dict[str, torch.Tensor]):
    def encode(texts, ids):
        feats = [cache.get(i) for i in ids]
        missing = [k for k, f in enumerate(feats) if f is None]
        if missing:
            fresh = model.embedder.encode([texts[k] for k in missing])
            for k, f in zip(missing, fresh):
                feats[k] = cache[ids[k]] = f
        with torch.no_grad():
            return model.encode_llm_features(torch.stack(feats))
    return encode


class _Timer:
    def __init__(self):
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.time()
        print(f"[demo] {name} ...", flush=True)
        yield
        self.steps[name] = time.time() - start
        print(f"[demo] {name}: {self.steps[name]:.0f} s", flush=True)


class DemoEvaluation:
    """The demo's eval sets, decoded once, and the rows of every model on them."""

    def __init__(self, cfg: RunConfig, model: ProCLIP, llm_cache: dict[str, torch.Tensor], languages: list[str]):
        self.cfg, self.model, self.llm_cache = cfg, model, llm_cache
        self.languages = languages
        groups: dict[str, list[str]] = {}
        for shard in expand_shards(cfg.data.eval_shards):
            groups.setdefault(dataset_name(shard), []).append(shard)
        self.sets = {}
        for name, shards in groups.items():
            skips: Counter = Counter()
            self.sets[name] = load_image_text(shards, model.preprocess_eval, self.languages,
                                              cfg.data.max_eval_samples, skips)
            if skips:
                log.warning("demo eval %s: skipped %s", name, dict(skips))
        language_set = next((k for k in self.sets if k.endswith("test-language")), None)
        self.long = None
        if language_set:  # the long-caption test, on the known images
            images, keys, metas = self.sets[language_set]
            n = min(len(keys), LONG_CAPTION_IMAGES)
            self.long = (images[:n], keys[:n], long_caption_metas({k: metas[k] for k in keys[:n]}))
        self.rows: list[dict] = []

    def run(self, label: str, prompt: bool = False, with_clip_text: bool = False) -> None:
        model = self.model
        model.eval()
        encoders, truncation = {}, {}
        if with_clip_text:
            encoders[CLIP_TOWER] = lambda texts, ids: model.encode_text_clip(texts)
            truncation[CLIP_TOWER] = functools.partial(model.count_truncated, tower="clip")
        if prompt:  # live through the embedder with the learned context: only the long captions
            encoders[label] = lambda texts, ids: model.encode_text(texts, prompt=True, batch_size=64)
        else:
            encoders[label] = _cached_text_encoder(model, self.llm_cache)
        truncation[label] = functools.partial(model.count_truncated, tower="prompt" if prompt else "llm")
        image_encoder = lambda x: model.encode_image(x)  # noqa: E731
        if not prompt:
            for name, (images, keys, metas) in self.sets.items():
                self.rows += evaluate_loaded(image_encoder, encoders, images, keys, metas, self.languages, name,
                                             truncation)
        if self.long is not None:
            images, keys, metas = self.long
            self.rows += evaluate_loaded(image_encoder, encoders, images, keys, metas, [LONG], "long captions",
                                         truncation)


def run_demo(output_dir: str, config: Optional[str] = None, overrides=None, resume: bool = False,
             progress: bool = True) -> Path:
    out = Path(output_dir)
    teacher_path = out / "teacher.safetensors"
    base = [f"output_dir={out}", *(overrides or [])]
    cfg = load_config(config or DEFAULT_CONFIG, base)
    timer = _Timer()
    total = time.time()

    with timer("teacher CLIP"):
        if teacher_path.exists() and not resume:
            print(f"[demo] reusing trained teacher {teacher_path}")
        else:
            pipeline.run_teacher(cfg, resume=resume, progress=progress)
    with timer("load embedder"):
        cfg = load_config(config or DEFAULT_CONFIG, [*base, f"clip.checkpoint={teacher_path}"])
        model = ProCLIP.from_config(cfg)
    with timer("embedding cache"):
        pipeline.build_caches(cfg, model, progress=progress)
    # the languages the eval caches hold (pipeline.cache_languages); empty eval_languages: all
    eval_languages = sorted(set(cfg.data.eval_languages) | set(cfg.data.train_languages)) if cfg.data.eval_languages else None
    llm_ids, llm_feats, _ = pipeline.llm_cache(cfg, model).load(cfg.data.eval_shards, eval_languages)
    clip_ids, clip_feats, _ = pipeline.teacher_cache(cfg, model).load(cfg.data.eval_shards, eval_languages)
    with timer("decode eval images"):
        evaluation = DemoEvaluation(cfg, model, dict(zip(llm_ids, llm_feats)), eval_languages)

    text_rows: list[dict] = []
    text_languages = eval_languages or sorted({cid.rsplit("|", 2)[1] for cid in llm_ids})

    def subset(ids, feats, keys):
        pick = [i for i, cid in enumerate(ids) if cid.rsplit("|", 2)[0] in keys]
        return [ids[i] for i in pick], feats[pick]
    # each eval set's cached names, split out once; test-style names the same concepts as
    # test-language, so its text measure would only repeat that one
    text_sets = {name: (*subset(llm_ids, llm_feats, set(keys)), *subset(clip_ids, clip_feats, set(keys)))
                 for name, (_, keys, _) in sorted(evaluation.sets.items()) if not name.endswith("test-style")}

    def text_measure(students: dict) -> None:
        for name, (l_ids, l_feats, c_ids, c_feats) in text_sets.items():
            text_rows.extend(text_transfer_rows(l_ids, l_feats, c_ids, c_feats, text_languages, students, name))

    adapter_fn = lambda feats: model.encode_llm_features(feats, normalize=False)  # noqa: E731
    with timer("text measure, before stage 1"):
        text_measure({CLIP_TOWER: None, "before stage 1": adapter_fn})
    stages = [("stage 1", "stage1.safetensors", pipeline.run_stage1, "after stage 1", False),
              ("stage 2", "stage2.safetensors", pipeline.run_stage2, "after stage 2", False),
              ("CoOp head", "coop.safetensors", pipeline.run_coop, "+ CoOp context", True)]
    for name, filename, run_stage, label, prompt in stages:
        with timer(name):
            path = out / filename
            if path.exists() and not resume:
                model.load(path)
                print(f"[demo] reusing {path}")
            else:
                run_stage(cfg, resume=resume, model=model, progress=progress)
        with timer(f"eval {name}"):
            evaluation.run(label, prompt=prompt, with_clip_text=not evaluation.rows)
            if name == "stage 1":
                text_measure({"after stage 1": adapter_fn})
    timer.steps["total"] = time.time() - total
    peak_gb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024 ** 2
    write_report(out, evaluation.rows, text_rows, timer.steps, peak_gb)
    return out / "results.md"


# ----------------------------------------------------------------------------- report

def _mean(rows: list[dict], metric: str) -> tuple[float, float]:
    return image_weighted_mean(rows, metric), image_weighted_se(rows, metric)


def split_summary(rows: list[dict]) -> list[dict]:
    """Per model: English t2i R@1, and the non-English means (weighted by images) of R@1/5/10."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        english = [r for r in mine if r["language"] == "en"]
        others = [r for r in mine if r["language"] != "en"]
        row = {"model": model}
        if english:
            row["en t2i R@1"] = with_se(english[0]["t2i_R@1"], english[0].get("t2i_R@1_se"))
        for k in (1, 5, 10):
            if others and f"t2i_R@{k}" in others[0]:
                row[f"non-en t2i R@{k}"] = with_se(*_mean(others, f"t2i_R@{k}"))
        if others and "i2t_R@1" in others[0]:
            row["non-en i2t R@1"] = with_se(*_mean(others, "i2t_R@1"))
        if others:
            row["chance R@1"] = f"{image_weighted_mean(others, 't2i_R@1_chance'):.4f}"
        out.append(row)
    return out


def claims(rows: list[dict], text_rows: list[dict]) -> list[str]:
    """One sentence per claim: holds beyond 3 standard errors, or not, with the numbers."""
    def pick(dataset, model, non_english=True, source=rows):
        return [r for r in source if r["dataset"] == dataset and r["model"] == model
                and (r["language"] != "en") == non_english]

    def verdict(gap):
        return f"**holds** ({gap:.1f} s.e.)" if gap > SIGMAS else f"**does not hold beyond {SIGMAS:.0f} s.e.** ({gap:.1f} s.e.)"

    out = []
    teacher = pick("styles-test-style", CLIP_TOWER, non_english=False)
    if teacher:
        t = teacher[0]
        out.append(f"- Teacher quality: the CLIP text tower's English text→image R@1 on test-style (a drawing style it "
                   f"never saw) is {with_se(t['t2i_R@1'], t['t2i_R@1_se'])} (chance {t['t2i_R@1_chance']:.4f}; "
                   f"target ≥ 0.20: {'met' if t['t2i_R@1'] >= 0.20 else 'missed'}).")
    for dataset, what in (("styles-test-language", "the training drawings"), ("styles-test-style", "Twemoji drawings"),
                          ("styles-test-concept", "held-out concepts")):
        base, after = pick(dataset, CLIP_TOWER), pick(dataset, "after stage 1")
        if base and after:
            cells = []
            for k in (1, 10):
                (a, a_se), (b, b_se) = _mean(after, f"t2i_R@{k}"), _mean(base, f"t2i_R@{k}")
                ratio = f"{a / b:.1f}×" if b else "∞×"
                cells.append(f"R@{k} {with_se(a, a_se)} vs {with_se(b, b_se)} ({ratio}): "
                             f"{verdict(gap_in_se(a, a_se, b, b_se))}")
            out.append(f"- Multilingual, {dataset} ({what}): non-English text→image after stage 1 vs the CLIP text "
                       f"tower: {'; '.join(cells)}.")
    for dataset in dict.fromkeys(r["dataset"] for r in text_rows):
        base, after = pick(dataset, CLIP_TOWER, source=text_rows), pick(dataset, "after stage 1", source=text_rows)
        if base and after:
            (a, a_se), (b, b_se) = _mean(after, "t2i_R@1"), _mean(base, "t2i_R@1")
            out.append(f"- Text only, {dataset}: a non-English name finds the teacher's English name of its concept at "
                       f"R@1 {with_se(a, a_se)} after stage 1 vs {with_se(b, b_se)} through the CLIP text tower: "
                       f"{verdict(gap_in_se(a, a_se, b, b_se))}.")
    base, after = pick("long captions", CLIP_TOWER), pick("long captions", "after stage 2")
    if base and after:
        b, a = base[0], after[0]
        out.append(f"- Long captions: text→image R@1 after stage 2 {with_se(a['t2i_R@1'], a['t2i_R@1_se'])} vs the CLIP "
                   f"text tower {with_se(b['t2i_R@1'], b['t2i_R@1_se'])}, which cut {b.get('truncated', 0)} of "
                   f"{b['captions']} captions: {verdict(gap_in_se(a['t2i_R@1'], a['t2i_R@1_se'], b['t2i_R@1'], b['t2i_R@1_se']))}.")
    return out


def write_report(out: Path, rows: list[dict], text_rows: list[dict], timings: dict, peak_gb: float) -> None:
    with (out / "demo_rows.jsonl").open("w") as f:
        for row in rows + text_rows:
            f.write(json.dumps(row) + "\n")
    parts = ["# proalign demo results", "",
             f"Every number is ± 1 standard error; a claim holds when its gap exceeds {SIGMAS:.0f} standard errors "
             "of the difference. Means over languages weigh each language by its images (or queries).", "",
             "## Claims", "", *claims(rows, text_rows), ""]
    if text_rows:
        parts += ["## Text only: a concept's name in each language → the teacher's English names", "",
                  "R@1 (chance 1/concepts). It measures the distillation alone, without the image tower.", ""]
        for dataset in dict.fromkeys(r["dataset"] for r in text_rows):
            subset = [r for r in text_rows if r["dataset"] == dataset]
            plot = out / f"text_{dataset}.png"
            plot_languages(subset, plot, "t2i_R@1", f"{dataset}: name in L → teacher's English name, R@1")
            parts += [f"### {dataset} ({subset[0]['concepts']} concepts)", "",
                      language_table(subset, "t2i_R@1", mean_excludes=["en"]), "",
                      f"![{dataset}]({plot.name})", ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        parts += [f"## {dataset}: {subset[0]['images']} images", ""]
        if len({r["language"] for r in subset}) > 1:
            parts += [markdown_table(split_summary(subset), ["model", "en t2i R@1", "non-en t2i R@1", "non-en t2i R@5",
                                                             "non-en t2i R@10", "non-en i2t R@1", "chance R@1"]), ""]
            plot = out / f"{dataset}_t2i_r1.png"
            plot_languages(subset, plot, "t2i_R@1", f"{dataset}: text→image R@1 per language")
            parts += ["Text→image R@1 per language:", "", language_table(subset, "t2i_R@1"), "",
                      f"![{dataset}]({plot.name})", ""]
        else:
            parts += [markdown_table([{**r, **{c: with_se(r[c], r.get(f"{c}_se")) for c in
                                               ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5")}} for r in subset],
                                     ["model", "captions", "truncated", "t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5"]),
                      "", f"Chance t2i R@1 = {subset[0]['t2i_R@1_chance']:.4f}.", ""]
    coop = out / "coop_results.md"
    if coop.exists():
        parts += ["## CoOp head (zero-shot classification of the held-out concepts by language of the class names)", "",
                  coop.read_text().split("\n", 2)[-1], "![CoOp accuracy](coop_accuracy.png)", ""]
    parts += ["## Time per step (seconds)", "",
              markdown_table([{"step": k, "seconds": round(v, 1)} for k, v in timings.items()], ["step", "seconds"]),
              "", f"Peak RSS: {peak_gb:.2f} GB.", ""]
    (out / "results.md").write_text("\n".join(parts))
    (out / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1) + "\n")
    print("\n".join(parts))
    print(f"[demo] wrote {out / 'results.md'}")
