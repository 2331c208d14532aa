"""CoOp's evaluation protocol as one command: one CoOp head per (shots K, seed), the few-shot
subset drawn per seed, mean ± std over seeds per K against the hand-written zero-shot prompt,
a table and CoOp's accuracy-vs-shots plot; optionally base-to-new (harmonic mean of base and new).

Each (K, seed) run lives in `<output_dir>/shots-<K>/seed-<seed>/` and ends with `result.json`;
re-running (after a kill, or with more shots or seeds) skips the runs that have one and resumes an
interrupted run from its checkpoints.
"""
from __future__ import annotations

import copy
import json
import logging
import statistics
from pathlib import Path
from typing import Optional, Sequence

from ..config import RunConfig
from ..storage import atomic_write_text
from .common import is_main

log = logging.getLogger(__name__)
LEARNED = "acc learned context"
HANDWRITTEN = "acc hand-written"


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def run_dir(out: Path, shots: int, seed: int) -> Path:
    return out / f"shots-{shots}" / f"seed-{seed}"


def _mean_accuracy(rows: list[dict], key: str) -> float:
    """Mean over languages (each language counts once, as CoOp's per-dataset means do)."""
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")


def _result(summary: dict) -> dict:
    """What the protocol keeps of one run: per part (all | base, new), per language, the accuracies."""
    parts = {"base" if summary.get("classes") == "base-to-new" else "all": summary["rows"]}
    if "rows_new" in summary:
        parts["new"] = summary["rows_new"]
    return {"shots": summary["shots"], "seed": summary["seed"], "classes": summary.get("classes", "all"),
            "parts": {part: [{k: r[k] for k in ("language", "classes", "images", HANDWRITTEN, LEARNED) if k in r}
                             for r in rows] for part, rows in parts.items()}}


def run_protocol(cfg: RunConfig, shots: Sequence[int], seeds: Sequence[int], base_to_new: bool = False,
                 progress: bool = True) -> list[dict]:
    """Train and evaluate one head per (K, seed); returns the per-run results and writes
    coop_protocol.md, coop_protocol.png and coop_protocol.jsonl in `cfg.output_dir`."""
    from ..models.proclip import ProCLIP
    from ..checkpoints import CheckpointManager
    from .coop import CoopTask, run_coop
    if not cfg.init_from:
        raise ValueError("coop protocol: set init_from (the stage-2 model the heads start from)")
    shots, seeds = sorted(set(shots)), list(dict.fromkeys(seeds))
    if not shots or min(shots) < 1:
        raise ValueError(f"--shots must be positive integers, got {shots}")
    out = Path(cfg.output_dir)
    classes = "base-to-new" if base_to_new else "all"
    model: Optional[ProCLIP] = None
    results = []
    for k in shots:
        for seed in seeds:
            folder = run_dir(out, k, seed)
            done = folder / "result.json"
            if done.exists():
                result = json.loads(done.read_text())
                if result.get("classes") == classes:
                    print(f"coop protocol: shots {k}, seed {seed}: finished before, skipped")
                    results.append(result)
                    continue
                raise ValueError(f"{done}: a {result.get('classes')} run, but this protocol is {classes}; "
                                 "use another output_dir")
            print(f"coop protocol: shots {k}, seed {seed} ...")
            sub = copy.deepcopy(cfg)
            sub.output_dir, sub.seed, sub.coop.shots = str(folder), seed, k
            if model is None:
                model = ProCLIP.from_config(sub)
            elif sub.coop.train_adapter:  # the adapter trained in the last run: start from init_from again
                model.load(sub.init_from)
            # the engine checkpoints under <run>/<task name>/checkpoints
            resume = CheckpointManager(folder / CoopTask.name).latest() is not None
            summary = run_coop(sub, resume=resume, model=model, progress=progress, classes=classes,
                               save_model=False)
            result = _result(summary)
            if is_main():
                atomic_write_text(done, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
            results.append(result)
    if is_main():
        write_protocol_report(results, out, shots, seeds, base_to_new)
    return results


def aggregate(results: list[dict], part: str) -> dict:
    """shots -> {language -> [learned accuracy per seed]}, plus the hand-written accuracy per language."""
    learned: dict[int, dict[str, list[float]]] = {}
    handwritten: dict[str, list[float]] = {}
    for result in results:
        for row in result["parts"].get(part, []):
            learned.setdefault(result["shots"], {}).setdefault(row["language"], []).append(row[LEARNED])
            handwritten.setdefault(row["language"], []).append(row[HANDWRITTEN])
    return {"learned": learned, "handwritten": {lang: statistics.fmean(v) for lang, v in handwritten.items()}}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _per_seed_means(results: list[dict], part: str, shots: int) -> list[float]:
    """Per seed: the learned accuracy averaged over languages."""
    return [_mean_accuracy(r["parts"][part], LEARNED) for r in results if r["shots"] == shots and part in r["parts"]]


def protocol_table(results: list[dict], part: str) -> str:
    from ..eval.report import markdown_table
    agg = aggregate(results, part)
    languages = list(agg["handwritten"])
    rows = [{"shots": "0 (hand-written prompt)", **{lang: f"{100 * agg['handwritten'][lang]:.1f}" for lang in languages},
             "mean": f"{100 * statistics.fmean(agg['handwritten'].values()):.1f}"}]
    for k in sorted(agg["learned"]):
        by_lang = agg["learned"][k]
        rows.append({"shots": str(k), **{lang: _cell(by_lang[lang]) for lang in languages if lang in by_lang},
                     "mean": _cell(_per_seed_means(results, part, k)),
                     "seeds": str(len(_per_seed_means(results, part, k)))})
    return markdown_table(rows, ["shots", *languages, "mean", "seeds"])


def base_to_new_table(results: list[dict]) -> str:
    from ..eval.report import markdown_table
    rows = []
    base_hw = _mean_accuracy(results[0]["parts"]["base"], HANDWRITTEN) if results else float("nan")
    new_hw = _mean_accuracy(results[0]["parts"]["new"], HANDWRITTEN) if results else float("nan")
    rows.append({"shots": "0 (hand-written prompt)", "base": f"{100 * base_hw:.1f}", "new": f"{100 * new_hw:.1f}",
                 "H": f"{100 * harmonic_mean(base_hw, new_hw):.1f}"})
    for k in sorted({r["shots"] for r in results}):
        base, new = _per_seed_means(results, "base", k), _per_seed_means(results, "new", k)
        rows.append({"shots": str(k), "base": _cell(base), "new": _cell(new),
                     "H": _cell([harmonic_mean(b, n) for b, n in zip(base, new)])})
    return markdown_table(rows, ["shots", "base", "new", "H"])


def plot_protocol(results: list[dict], part: str, path: Path, title: str) -> None:
    """CoOp's figure: accuracy against shots (log scale), mean ± std over seeds per language and
    their mean, with the hand-written zero-shot prompt as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    agg = aggregate(results, part)
    shots = sorted(agg["learned"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for lang in agg["handwritten"]:
        stats = [mean_std(agg["learned"][k][lang]) for k in shots if lang in agg["learned"][k]]
        line = ax.errorbar(shots[:len(stats)], [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats],
                           marker="o", markersize=3, linewidth=0.8, capsize=2, label=lang, alpha=0.6)
        ax.axhline(100 * agg["handwritten"][lang], color=line[0].get_color(), linestyle="--", linewidth=0.6, alpha=0.6)
    means = [mean_std(_per_seed_means(results, part, k)) for k in shots]
    ax.errorbar(shots, [100 * m for m, _ in means], yerr=[100 * s for _, s in means], color="black", marker="s",
                linewidth=2, capsize=3, label="mean")
    ax.axhline(100 * statistics.fmean(agg["handwritten"].values()), color="black", linestyle="--", linewidth=1.2,
               label="hand-written (dashed)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("top-1 accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_protocol_report(results: list[dict], out: Path, shots: Sequence[int], seeds: Sequence[int],
                          base_to_new: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    part = "base" if base_to_new else "all"
    with (out / "coop_protocol.jsonl").open("w") as f:
        for result in results:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
    plot_protocol(results, part, out / "coop_protocol.png",
                  "CoOp: accuracy vs shots" + (" (base classes)" if base_to_new else ""))
    parts = ["# CoOp protocol", "",
             f"Shots {list(shots)}, seeds {list(seeds)}: one head per (shots, seed), the few-shot subset drawn "
             "per seed. Top-1 accuracy (%) by language of the class names, mean ± sample std over seeds; "
             "`mean` averages the languages within each seed first.", ""]
    if base_to_new:
        parts += ["## Base-to-new (trained on the base half of the classes; H = harmonic mean)", "",
                  base_to_new_table(results), "", "### Base classes by language", "", protocol_table(results, "base"),
                  "", "### New classes by language", "", protocol_table(results, "new"), ""]
    else:
        parts += [protocol_table(results, "all"), ""]
    parts += ["![accuracy vs shots](coop_protocol.png)", ""]
    path = out / "coop_protocol.md"
    atomic_write_text(path, "\n".join(parts))
    print("\n".join(parts))
    return path
