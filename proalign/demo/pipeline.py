"""`proalign demo`: the whole method on the embedded multi-style emoji benchmark, offline, with
error bars and a verdict per claim.

teacher (LiT: a small ViT learns the space of the pretrained English MiniLM-L6, locked) -> stage 1
(multilingual-e5-small, English captions only) -> stage 2 -> CoOp heads (the CoOp protocol), evaluated on
(data_shards/README.md):
- the text-only measure: a concept's name in language L against the teacher's English names;
- test-language: the training drawings, named in 10 languages (the text side alone);
- test-style: the training concepts drawn by Twemoji, a style never trained on;
- test-concept: held-out concepts;
- styles-long-test: 400 of the test-language images, each captioned by a long multilingual gloss
  of its concept (CLDR keywords in other languages, then the name past the teacher's 77 tokens).
Re-running reuses the teacher, the embedding caches and the stage model files (delete one to redo it).
"""
from __future__ import annotations

import contextlib
import copy
import resource
import shutil
import time
from pathlib import Path
from typing import Optional

from ..config import RunConfig, load_config
from ..data.cache import CachedTextFeatures
from ..data.captions import CaptionId
from ..data.shards import expand_shards
from ..eval.evaluator import CLIP_TOWER
from ..eval.text_transfer import text_transfer_rows
from ..models.proclip import ProCLIP
from ..stages import cache as caching
from ..stages.common import write_run_config
from ..stages.stage1 import run_stage1
from ..stages.stage2 import run_stage2
from ..stages.teacher import run_teacher
from .claims import protocol_gap
from .evalsets import LONG_SPLIT, DemoEvaluation, dataset_name
from .examples import search_example
from .report import write_report

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


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
    text_languages = eval_languages or sorted({CaptionId.parse(cid).language for cid in llm_ids})

    def subset(ids, feats, keys):
        pick = [i for i, cid in enumerate(ids) if CaptionId.parse(cid).key in keys]
        return [ids[i] for i in pick], feats[pick]
    # each eval set's cached names, split out once; test-style names the same concepts as
    # test-language, so its text measure would only repeat that one
    # (and the long glosses are not names)
    text_sets = {name: (*subset(llm_ids, llm_feats, set(s.keys)), *subset(clip_ids, clip_feats, set(s.keys)))
                 for name, s in sorted(evaluation.sets.items()) if not name.endswith(("test-style", LONG_SPLIT))}

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
    from ..stages.coop_protocol import run_protocol
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
