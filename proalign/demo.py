"""`proalign demo`: the whole method on the embedded multi-style emoji benchmark, offline, with
error bars and a verdict per claim.

teacher (LiT: a small ViT learns the space of the pretrained English MiniLM-L6, locked) -> stage 1
(multilingual-e5-small, English captions only) -> stage 2 -> CoOp heads (the CoOp protocol), evaluated on
(data_shards/README.md):
- the text-only measure: a concept's name in language L against the teacher's English names;
- test-language: the training drawings, named in 10 languages (the text side alone);
- test-style: the training concepts drawn by Twemoji, a style never trained on;
- test-concept: held-out concepts;
- long captions: the test-language images captioned by a fixed English preamble longer than the
  teacher's 77 tokens, then the concept's names: the text tower's cut leaves only the preamble,
  the LLM reads the names.
Re-running reuses the teacher, the embedding caches and the stage model files (delete one to redo it).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import resource
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import RunConfig, load_config
from .data.cache import CachedTextFeatures
from .data.shards import expand_shards
from .eval.evaluator import (CLIP_TOWER, EvalSet, Evaluator, clip_text_tower, image_encoder, llm_text_tower,
                             load_shard_set)
from .eval.report import (image_weighted_mean, image_weighted_se, language_table, markdown_table,
                          plot_languages, retrieval_sections, with_se, write_rows)
from .eval.text_transfer import text_transfer_rows
from .models.proclip import ProCLIP
from .models.towers import context_length, count_truncated
from .stages import cache as caching
from .stages.common import write_run_config
from .stages.stage1 import run_stage1
from .stages.stage2 import run_stage2
from .stages.teacher import run_teacher

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
LONG = "long"
# The long caption: a preamble the same for every image, longer than the teacher's 77 tokens, then
# the concept's names in the eval languages (English last). Whatever the text tower keeps after its
# cut is the preamble alone; the discriminating names sit after it.
LONG_PREAMBLE = (
    "This is one picture from a large collection of small square colour drawings that were made for "
    "phones, computers and chat programs around the world. Every drawing in the collection shows one "
    "single thing in a flat and simple style, with bold outlines, bright colours and a plain empty "
    "background, and it is meant to be read at a glance by people in every country, whatever the "
    "language they speak. The same idea is drawn by several artists in slightly different ways. The "
    "thing shown in this particular picture is called, in several languages:")
SEPARATOR = " / "
SIGMAS = 3.0
# Images in the long-caption test (each caption runs through the embedder live, per model).
LONG_CAPTION_IMAGES = 400
NON_LATIN = ("ru", "zh", "ja", "ar", "hi", "th", "uk", "el", "he", "fa", "bn", "am", "ko")


def dataset_name(shard: str) -> str:
    """`data_shards/styles-test-style-001.tar` -> `styles-test-style`."""
    return Path(shard).name.rsplit("-", 1)[0]


def long_caption_metas(metas: dict, languages: Optional[Sequence[str]] = None) -> dict:
    """Each sample's caption: the preamble, then its names in `languages` (all: None), English last."""
    out = {}
    for key, meta in metas.items():
        caps = meta["captions"]
        names = [caps[lang][0] for lang in sorted(caps)
                 if lang != "en" and caps[lang] and (languages is None or lang in languages)]
        if caps.get("en"):
            out[key] = {"captions": {LONG: [f"{LONG_PREAMBLE} {SEPARATOR.join(names + [caps['en'][0]])}."]}}
    return out


def names_past_the_cut(tokenizer, context: int) -> bool:
    """The teacher's tokenizer reaches the first name only after `context` tokens (its start and
    end tokens included): what the 77-token tower keeps of a long caption is the preamble alone."""
    return count_truncated(tokenizer, [LONG_PREAMBLE], context - 1) == 1  # the preamble alone fills the context


def gap_in_se(a: float, a_se: float, b: float, b_se: float) -> float:
    """(a - b) in standard errors of the difference (independent samples: a conservative
    approximation for paired ones)."""
    se = (a_se ** 2 + b_se ** 2) ** 0.5
    return (a - b) / se if se > 0 else float("inf") if a != b else 0.0


# Seconds per demo step with configs/demo.yaml on 2 CPU cores (docs/demo-benchmark-*.md), and the
# config field that scales it: the ETA is these, scaled by the config and by this machine's speed.
REFERENCE_SECONDS = {
    "teacher CLIP": (243, ("teacher", 700)), "load embedder": (3, None), "embedding cache": (186, None),
    "decode eval images": (3, None), "text measure, before stage 1": (3, None),
    "stage 1": (32, ("stage1", 600)), "eval stage 1": (52, None), "stage 2": (55, ("stage2", 200)),
    "eval stage 2": (7, None), "CoOp protocol": (95, None), "search example": (4, None),
}
# CoOp's protocol on the benchmark: one class per concept, shots = drawing styles (the training split
# draws each concept in 4 styles), tested on the Twemoji drawings (a fifth style) of the same concepts.
PROTOCOL_SHOTS = [1, 4]
PROTOCOL_SEEDS = [1, 2]
PROTOCOL_CLASSES = 150
PROTOCOL_TEST = "styles-test-style"


def planned_seconds(cfg: RunConfig, name: str, reused: bool = False) -> float:
    """Expected seconds of a demo step under `cfg` on the reference machine (0 when reused)."""
    if reused:
        return 0.0
    seconds, scaled_by = REFERENCE_SECONDS.get(name, (10, None))
    if scaled_by:
        stage, reference_steps = scaled_by
        seconds *= getattr(cfg, stage).train.steps / reference_steps
    return float(seconds)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class StepClock:
    """`[k/n] step` lines with the elapsed time and an overall ETA: the planned seconds of the steps
    left, times how this machine compares with the reference so far."""

    def __init__(self, plan: dict[str, float]):
        self.plan = dict(plan)
        self.steps: dict[str, float] = {}
        self.start = time.time()

    def speed(self) -> float:
        done = [(self.steps[n], self.plan[n]) for n in self.steps if self.plan.get(n, 0) >= 5]
        if not done:
            return 1.0
        return min(max(sum(a for a, _ in done) / sum(p for _, p in done), 0.2), 5.0)

    def eta(self) -> float:
        return self.speed() * sum(s for n, s in self.plan.items() if n not in self.steps)

    @contextlib.contextmanager
    def __call__(self, name: str):
        k = list(self.plan).index(name) + 1 if name in self.plan else len(self.steps) + 1
        began = time.time()
        print(f"[{k}/{len(self.plan)}] {name} ... (elapsed {_clock(began - self.start)}, "
              f"ETA {_clock(self.eta())})", flush=True)
        yield
        self.steps[name] = time.time() - began
        print(f"[{k}/{len(self.plan)}] {name}: {self.steps[name]:.0f} s (elapsed {_clock(time.time() - self.start)}, "
              f"ETA {_clock(self.eta())})", flush=True)


class DemoEvaluation:
    """The demo's eval sets, decoded once (plus the long-caption set), and the rows of every model."""

    def __init__(self, cfg: RunConfig, model: ProCLIP, llm_features: CachedTextFeatures, languages,
                 progress: bool = False, clip_features: Optional[CachedTextFeatures] = None):
        self.model, self.llm_features, self.clip_features = model, llm_features, clip_features
        groups: dict[str, list[str]] = {}
        for shard in expand_shards(cfg.data.eval_shards):
            groups.setdefault(dataset_name(shard), []).append(shard)
        sets = [load_shard_set(name, shards, model.preprocess_eval, languages, cfg.data.max_eval_samples)
                for name, shards in groups.items()]
        self.evaluator = Evaluator(sets, progress)
        self.split_names = [s.name for s in sets]
        language_set = next((s for s in sets if s.name.endswith("test-language")), None)
        self.long_name, self.long_names_cut = None, False
        if language_set:  # the long-caption test, on the known images
            n = min(len(language_set.keys), LONG_CAPTION_IMAGES)
            keys = language_set.keys[:n]
            self.long_name = "long captions"
            self.evaluator.sets[self.long_name] = EvalSet(
                self.long_name, language_set.images[:n], keys,
                long_caption_metas({k: language_set.metas[k] for k in keys}, languages), [LONG])
            self.long_names_cut = names_past_the_cut(model.clip_tokenizer, context_length(model.clip))
        self.rows: list[dict] = []

    @property
    def sets(self) -> dict[str, EvalSet]:
        return {name: self.evaluator.sets[name] for name in self.split_names}

    def run(self, label: str, with_clip_text: bool = False) -> None:
        """Every split and the long captions with the cached LLM features (the long captions are
        encoded once, then kept), plus the CLIP text tower when `with_clip_text`."""
        model = self.model
        model.eval()
        towers = [clip_text_tower(model, cache=self.clip_features)] if with_clip_text else []
        towers.append(llm_text_tower(model, label, self.llm_features))
        names = list(self.split_names) + ([self.long_name] if self.long_name else [])
        self.rows += self.evaluator.evaluate(image_encoder(model), towers, names)


def run_demo(output_dir: str, config: Optional[str] = None, overrides=None, resume: bool = False,
             progress: bool = True) -> Path:
    out = Path(output_dir)
    teacher_path = out / "teacher.safetensors"
    base = [f"output_dir={out}", *(overrides or [])]
    cfg = load_config(config or DEFAULT_CONFIG, base)
    # (step, model file, driver, label of its retrieval rows). The CoOp head is shown by the CoOp
    # protocol below (heads per shot count and seed against the hand-written prompt); a single head
    # on all training concepts cost over a minute of the 15-minute budget for a table no claim read
    # (`proalign coop` on the finished run trains one: README).
    stages = [("stage 1", "stage1.safetensors", run_stage1, "after stage 1"),
              ("stage 2", "stage2.safetensors", run_stage2, "after stage 2")]
    reused = {"teacher CLIP": teacher_path.exists() and not resume}
    reused.update({name: (out / filename).exists() and not resume for name, filename, *_ in stages})
    names = ["teacher CLIP", "load embedder", "embedding cache", "decode eval images", "text measure, before stage 1"]
    names += [n for name, *_ in stages for n in (name, f"eval {name}")]
    names += ["CoOp protocol", "search example"]
    timer = StepClock({n: planned_seconds(cfg, n, reused.get(n, False)) for n in names})
    total = time.time()

    with timer("teacher CLIP"):
        if teacher_path.exists() and not resume:
            print(f"      reusing trained teacher {teacher_path}")
        else:
            run_teacher(cfg, resume=resume, progress=progress)
    with timer("load embedder"):
        cfg = load_config(config or DEFAULT_CONFIG, [*base, f"clip.checkpoint={teacher_path}"])
        write_run_config(cfg)
        model = ProCLIP.from_config(cfg)
    with timer("embedding cache"):
        caching.build_caches(cfg, model, progress=progress)
    eval_languages = caching.eval_languages(cfg)
    llm_ids, llm_feats, _ = caching.llm_cache(cfg, model).load(cfg.data.eval_shards, eval_languages)
    clip_ids, clip_feats, _ = caching.teacher_cache(cfg, model).load(cfg.data.eval_shards, eval_languages)
    with timer("decode eval images"):
        llm_features = CachedTextFeatures(llm_ids, llm_feats, lambda texts: model.embedder.encode(texts))
        # the teacher's rows of the same captions (its text tower is frozen from here on)
        clip_features = CachedTextFeatures(clip_ids, clip_feats, lambda texts: model.encode_text_clip(texts, False))
        evaluation = DemoEvaluation(cfg, model, llm_features, eval_languages, progress, clip_features)

    text_rows: list[dict] = []
    text_languages = eval_languages or sorted({cid.rsplit("|", 2)[1] for cid in llm_ids})

    def subset(ids, feats, keys):
        pick = [i for i, cid in enumerate(ids) if cid.rsplit("|", 2)[0] in keys]
        return [ids[i] for i in pick], feats[pick]
    # each eval set's cached names, split out once; test-style names the same concepts as
    # test-language, so its text measure would only repeat that one
    text_sets = {name: (*subset(llm_ids, llm_feats, set(s.keys)), *subset(clip_ids, clip_feats, set(s.keys)))
                 for name, s in sorted(evaluation.sets.items()) if not name.endswith("test-style")}

    def text_measure(students: dict) -> None:
        for name, (l_ids, l_feats, c_ids, c_feats) in text_sets.items():
            text_rows.extend(text_transfer_rows(l_ids, l_feats, c_ids, c_feats, text_languages, students, name))

    adapter_fn = lambda feats: model.encode_llm_features(feats, normalize=False)  # noqa: E731
    with timer("text measure, before stage 1"):
        text_measure({CLIP_TOWER: None, "before stage 1": adapter_fn})
    for name, filename, run_stage, label in stages:
        with timer(name):
            path = out / filename
            if path.exists() and not resume:
                model.load(path)
                print(f"      reusing {path}")
            else:
                run_stage(cfg, resume=resume, model=model, progress=progress)
        with timer(f"eval {name}"):
            evaluation.run(label, with_clip_text=not evaluation.rows)
            if name == "stage 1":
                text_measure({"after stage 1": adapter_fn})
    with timer("CoOp protocol"):
        protocol_lines, protocol_results = coop_protocol(cfg, out, progress)
    with timer("search example"):
        search_lines, search_found = search_example(cfg, out)
    timer.steps["total"] = time.time() - total
    peak_gb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024 ** 2
    evidence = {"long_names_cut": evaluation.long_names_cut, "protocol": protocol_gap(protocol_results),
                "search": search_found}
    write_report(out, evaluation.rows, text_rows, timer.steps, peak_gb, search_lines, protocol_lines, evidence)
    return out / "results.md"


# ----------------------------------------------------------------------------- CoOp protocol

def coop_protocol(cfg: RunConfig, out: Path, progress: bool = True) -> list[str]:
    """`proalign coop --shots 1 2 4 --seeds 1 2 3` on the benchmark as a classification task (see
    PROTOCOL_*); its table and plot go into results.md."""
    from .stages.coop_protocol import run_protocol
    test = [sh for sh in expand_shards(cfg.data.eval_shards) if dataset_name(sh) == PROTOCOL_TEST]
    stage2 = out / "stage2.safetensors"
    if not test or not stage2.exists():
        return [], []
    sub = copy.deepcopy(cfg)
    sub.output_dir, sub.init_from = str(out / "coop-protocol"), str(stage2)
    sub.coop.eval_shards, sub.coop.max_classes = test, PROTOCOL_CLASSES
    results = run_protocol(sub, PROTOCOL_SHOTS, PROTOCOL_SEEDS, progress=progress)
    report = (out / "coop-protocol" / "coop_protocol.md").read_text().split("\n", 1)[1]
    shutil.copy(out / "coop-protocol" / "coop_protocol.png", out / "coop_protocol.png")
    shots = " or ".join(str(k) for k in PROTOCOL_SHOTS)
    lines = [f"## CoOp protocol: {PROTOCOL_CLASSES} concepts as classes, shots = drawing styles, tested on Twemoji",
             "", f"Zero-shot (hand-written prompt, shots 0) and CoOp heads trained on {shots} of each concept's "
             f"training drawings (styles), seeds {', '.join(map(str, PROTOCOL_SEEDS))}, tested on the same "
             f"{PROTOCOL_CLASSES} concepts drawn by Twemoji (a style never trained on), by language of the class "
             "names.", *report.split("\n")]
    return lines, results


def protocol_gap(results: list[dict]) -> Optional[dict]:
    """Learned context vs hand-written prompt at the largest shot count, pooled over languages and
    seeds: accuracies over all (language, seed) test images, binomial standard errors."""
    from .stages.coop_protocol import HANDWRITTEN, LEARNED
    if not results:
        return None
    top = max(r["shots"] for r in results)
    cells = [row for r in results if r["shots"] == top for row in r["parts"].get("all", [])]
    n = sum(row["images"] for row in cells)
    if not n:
        return None
    out = {"shots": top, "runs": sum(r["shots"] == top for r in results), "images": n}
    for key, name in ((LEARNED, "learned"), (HANDWRITTEN, "handwritten")):
        acc = sum(row[key] * row["images"] for row in cells) / n
        out[name], out[f"{name}_se"] = acc, (acc * (1 - acc) / n) ** 0.5
    return out


# ----------------------------------------------------------------------------- search example

SEARCH_SPLIT = "styles-test-style"         # Twemoji drawings: a style never trained on
SEARCH_CONCEPTS = ["red apple", "cat face", "dog face", "rocket", "sun"]
SEARCH_LANGUAGES = ["de", "ja", "ar", "sw"]
SEARCH_TOP_K = 5


def export_search_images(shards, folder: Path) -> dict[str, dict]:
    """The split's images as files `<key>.<ext>` (bytes as stored); returns key -> captions."""
    from .data.shards import IMAGE_EXTS, iter_raw_samples, parse_meta
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    for shard in shards:
        for sample in iter_raw_samples(shard):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                continue
            key = sample["__key__"]
            target = folder / f"{key}.{ext}"
            if not target.exists():
                target.write_bytes(sample[ext])
            captions[key] = parse_meta(sample, shard)["captions"]
    return captions


def search_example(cfg: RunConfig, out: Path) -> list[str]:
    """`proalign search` on the Twemoji drawings with the finished run: one concept's name in
    several languages, top-k hits each (a hit is right when it is that concept's drawing)."""
    from .loading import load
    from .search import build_index, search
    shards = [sh for sh in expand_shards(cfg.data.eval_shards) if dataset_name(sh) == SEARCH_SPLIT]
    if not shards:
        return [], None
    folder = out / "search-images"
    captions = export_search_images(shards, folder)
    english = {key: caps.get("en", [""])[0] for key, caps in captions.items()}
    key = next((k for c in SEARCH_CONCEPTS for k, name in english.items() if name == c), None)
    if key is None:
        return [], None
    queries = [(lang, captions[key][lang][0]) for lang in SEARCH_LANGUAGES if captions[key].get(lang)]
    model, _, _ = load(out, device="cpu")
    index, counts = build_index(model, folder, progress=False)
    hits = search(model, index, [q for _, q in queries], SEARCH_TOP_K)
    lines = [f"`proalign search {folder.name}/ QUERY --model {out.name}` over the {counts['images']} Twemoji drawings "
             f"of {SEARCH_SPLIT} (a style never trained on). The queries name **{english[key]}** "
             f"(`{key}`) in {len(queries)} languages; ✓ marks that concept's drawing (chance of a ✓ in the top "
             f"{SEARCH_TOP_K}: {SEARCH_TOP_K / counts['images']:.4f}).", "",
             "| language | query | rank | score | image (English name) |", "|---|---|---|---|---|"]
    for (lang, query), found in zip(queries, hits):
        for rank, hit in enumerate(found, 1):
            hit_key = Path(hit.path).stem
            mark = " ✓" if hit_key == key else ""
            lines.append(f"| {lang if rank == 1 else ''} | {query if rank == 1 else ''} | {rank} | {hit.score:+.3f} | "
                         f"`{hit.path}` ({english.get(hit_key, '?')}){mark} |")
    found_at = [next((r for r, h in enumerate(f, 1) if Path(h.path).stem == key), None) for f in hits]
    found = sum(r is not None for r in found_at)
    lines += ["", f"The drawing is in the top {SEARCH_TOP_K} for {found} of {len(queries)} queries.", "",
              *drawing_ranks(model, index, key, [("en", english[key]), *queries])]
    return lines, (found, len(queries))


def drawing_ranks(model, index, key: str, queries: list[tuple[str, str]]) -> list[str]:
    """Where the concept's drawing ranks among all the images for each query, through the LLM
    tower and through the CLIP text tower (what limits a search: the text side or the image side)."""
    target = next((i for i, path in enumerate(index.paths) if Path(path).stem == key), None)
    if target is None:
        return []
    images = index.embeddings.float()  # unit rows, as `search` scores them

    def rank(query_embedding):
        scores = images @ query_embedding.float()
        return int((scores > scores[target]).sum()) + 1
    lines = [f"Rank of the drawing among all {len(index.paths)} images (1 = top):", "",
             "| language | query | LLM tower | CLIP text tower |", "|---|---|---|---|"]
    for lang, query in queries:
        lines.append(f"| {lang} | {query} | {rank(model.encode_text(query))} | "
                     f"{rank(model.encode_text_clip([query])[0])} |")
    return lines + [""]


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


# The demo's targets (issue #23): what each claim must show to count as shown.
TEACHER_TARGETS = {"styles-test-language": 0.15, "styles-test-style": 0.05}
TEXT_RATIO, TEXT_SIGMAS, NON_LATIN_RATIO = 1.5, 10.0, 5.0
IMAGE_RATIO, IMAGE_SIGMAS = 2.0, 5.0


def _met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def claims(rows: list[dict], text_rows: list[dict], evidence: Optional[dict] = None) -> list[str]:
    """One sentence per claim, with its numbers, its gap in standard errors and its target."""
    evidence = evidence or {}

    def pick(dataset, model, non_english=True, source=rows):
        return [r for r in source if r["dataset"] == dataset and r["model"] == model
                and (r["language"] != "en") == non_english]

    def verdict(gap):
        return f"**holds** ({gap:.1f} s.e.)" if gap > SIGMAS else f"**does not hold beyond {SIGMAS:.0f} s.e.** ({gap:.1f} s.e.)"

    def ratio(a, b):
        return a / b if b else float("inf")

    out = []
    for dataset, target in TEACHER_TARGETS.items():
        teacher = pick(dataset, CLIP_TOWER, non_english=False)
        if teacher:
            t = teacher[0]
            out.append(f"- Teacher quality, {dataset}: the CLIP text tower's English text→image R@1 is "
                       f"{with_se(t['t2i_R@1'], t['t2i_R@1_se'])} (R@10 {t['t2i_R@10']:.3f}; chance "
                       f"{t['t2i_R@1_chance']:.4f}); target ≥ {target:.2f}: {_met(t['t2i_R@1'] >= target)}.")
    for dataset in dict.fromkeys(r["dataset"] for r in text_rows):
        base, after = pick(dataset, CLIP_TOWER, source=text_rows), pick(dataset, "after stage 1", source=text_rows)
        if not (base and after):
            continue
        (a, a_se), (b, b_se) = _mean(after, "t2i_R@1"), _mean(base, "t2i_R@1")
        gap = gap_in_se(a, a_se, b, b_se)
        line = (f"- Text only, {dataset}: a non-English name finds the teacher's English name of its concept at "
                f"R@1 {with_se(a, a_se)} after stage 1 vs {with_se(b, b_se)} through the CLIP text tower "
                f"({ratio(a, b):.1f}×): {verdict(gap)}")
        if dataset == "styles-test-language":
            tower = {r["language"]: r["t2i_R@1"] for r in base}
            scripts = {r["language"]: ratio(r["t2i_R@1"], tower.get(r["language"], 0.0)) for r in after
                       if r["language"] in NON_LATIN}
            weak = [lang for lang, x in scripts.items() if x < NON_LATIN_RATIO]
            cells = ", ".join(f"{lang} {x:.1f}×" for lang, x in sorted(scripts.items()))
            line += (f"; target ≥ {TEXT_RATIO}× and > {TEXT_SIGMAS:.0f} s.e.: "
                     f"{_met(ratio(a, b) >= TEXT_RATIO and gap > TEXT_SIGMAS)}; non-Latin scripts ({cells}), "
                     f"target each ≥ {NON_LATIN_RATIO:.0f}×: {_met(not weak)}"
                     + (f" (below: {', '.join(weak)})" if weak else ""))
        out.append(line + ".")
    for dataset, what in (("styles-test-language", "the training drawings"), ("styles-test-style", "Twemoji drawings"),
                          ("styles-test-concept", "held-out concepts")):
        base, after = pick(dataset, CLIP_TOWER), pick(dataset, "after stage 1")
        if not (base and after):
            continue
        cells, r1 = [], None
        for k in (1, 10):
            (a, a_se), (b, b_se) = _mean(after, f"t2i_R@{k}"), _mean(base, f"t2i_R@{k}")
            gap = gap_in_se(a, a_se, b, b_se)
            r1 = r1 or (a, b, gap)
            cells.append(f"R@{k} {with_se(a, a_se)} vs {with_se(b, b_se)} ({ratio(a, b):.1f}×): {verdict(gap)}")
        line = (f"- Multilingual, {dataset} ({what}): non-English text→image after stage 1 vs the CLIP text "
                f"tower: {'; '.join(cells)}")
        if dataset == "styles-test-language":
            a, b, gap = r1
            line += (f"; target R@1 ≥ {IMAGE_RATIO:.0f}× and > {IMAGE_SIGMAS:.0f} s.e.: "
                     f"{_met(ratio(a, b) >= IMAGE_RATIO and gap > IMAGE_SIGMAS)}")
        out.append(line + ".")
    base = pick("long captions", CLIP_TOWER)
    if base:
        b = base[0]
        cut = "every name after the cut" if evidence.get("long_names_cut") else "the names not all after the cut"
        cells = []
        for direction, what in (("t2i", "text→image"), ("i2t", "image→text")):
            best = None
            for label in ("after stage 1", "after stage 2"):
                for a in (r for r in pick("long captions", label) if f"{direction}_R@1" in r and f"{direction}_R@1" in b):
                    gap = gap_in_se(a[f"{direction}_R@1"], a[f"{direction}_R@1_se"], b[f"{direction}_R@1"],
                                    b[f"{direction}_R@1_se"])
                    if best is None or gap > best[2]:
                        best = (label, a, gap)
            if best:
                label, a, gap = best
                cells.append(f"{what} R@1 {label} {with_se(a[f'{direction}_R@1'], a[f'{direction}_R@1_se'])} vs "
                             f"{with_se(b[f'{direction}_R@1'], b[f'{direction}_R@1_se'])}: {verdict(gap)}")
        if cells:
            llm_cut = max((r.get("truncated", 0) for r in rows if r["dataset"] == "long captions"
                           and r["model"] != CLIP_TOWER), default=0)
            out.append(f"- Long captions (the CLIP text tower cut {b.get('truncated', 0)} of {b['captions']} at its 77 "
                       f"tokens, {cut}; the LLM cut {llm_cut}): {'; '.join(cells)}.")
    protocol = evidence.get("protocol")
    if protocol:
        gap = gap_in_se(protocol["learned"], protocol["learned_se"], protocol["handwritten"], protocol["handwritten_se"])
        out.append(f"- CoOp protocol, {protocol['shots']} shots ({protocol['runs']} seeds, pooled over languages and "
                   f"seeds, {protocol['images']} test images): learned context "
                   f"{with_se(protocol['learned'], protocol['learned_se'])} vs the hand-written prompt "
                   f"{with_se(protocol['handwritten'], protocol['handwritten_se'])}: {verdict(gap)}.")
    search = evidence.get("search")
    if search:
        found, queries = search
        out.append(f"- Search: the concept's drawing is in the top {SEARCH_TOP_K} for {found} of {queries} queries; "
                   f"target most of them: {_met(2 * found > queries)}.")
    return out


SUMMARY_COLUMNS = ["model", "en t2i R@1", "non-en t2i R@1", "non-en t2i R@5", "non-en t2i R@10", "non-en i2t R@1",
                   "chance R@1"]


def write_report(out: Path, rows: list[dict], text_rows: list[dict], timings: dict, peak_gb: float,
                 search_lines: Optional[list[str]] = None, protocol_lines: Optional[list[str]] = None,
                 evidence: Optional[dict] = None) -> None:
    write_rows(rows + text_rows, out / "demo_rows.jsonl")
    parts = ["# proalign demo results", "",
             f"Every number is ± 1 standard error; a claim holds when its gap exceeds {SIGMAS:.0f} standard errors "
             "of the difference. Means over languages weigh each language by its images (or queries).", "",
             "## Claims", "", *claims(rows, text_rows, evidence), ""]
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
    parts += retrieval_sections(rows, out, split_summary, SUMMARY_COLUMNS)
    if protocol_lines:
        parts += protocol_lines
    if search_lines:
        parts += ["## Search: one concept named in several languages", "", *search_lines]
    parts += ["## Time per step (seconds)", "",
              markdown_table([{"step": k, "seconds": round(v, 1)} for k, v in timings.items()], ["step", "seconds"]),
              "", f"Peak RSS: {peak_gb:.2f} GB.", ""]
    (out / "results.md").write_text("\n".join(parts))
    (out / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1) + "\n")
    print("\n".join(parts))
    print(f"[demo] wrote {out / 'results.md'}")
