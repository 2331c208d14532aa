"""results.md tables and per-language bar plots; the CoOp protocol's table and accuracy-vs-shots plot."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ProalignError
from ..storage import atomic_savefig, atomic_write_text


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def pivot_by_language(rows: Sequence[dict], metric: str) -> tuple[list[str], list[str], dict]:
    models = list(dict.fromkeys(r["model"] for r in rows))
    langs = list(dict.fromkeys(r["language"] for r in rows))
    table = {(r["model"], r["language"]): r[metric] for r in rows}
    return models, langs, table


def image_weighted_mean(rows: Sequence[dict], metric: str) -> float:
    """Mean of `metric` over per-language rows, each weighted by its number of images, so a
    language with 5 images counts 5/400 of one with 400 (an unweighted mean lets it count as much)."""
    weight = sum(r["images"] for r in rows)
    return sum(r[metric] * r["images"] for r in rows) / weight if weight else float("nan")


def image_weighted_se(rows: Sequence[dict], metric: str) -> float:
    """Standard error of `image_weighted_mean`, treating the languages as independent samples
    (they share images, so this is a lower bound)."""
    weight = sum(r["images"] for r in rows)
    if not weight or any(f"{metric}_se" not in r for r in rows):
        return float("nan")
    return sum((r["images"] * r[f"{metric}_se"]) ** 2 for r in rows) ** 0.5 / weight


def with_se(value: float, se: Optional[float]) -> str:
    """`0.123 ± 0.010` (the ± part only when a standard error is known)."""
    if se is None or se != se:
        return f"{value:.3f}"
    return f"{value:.3f} ± {se:.3f}"


def language_table(rows: Sequence[dict], metric: str = "t2i_R@1", mean_excludes: Sequence[str] = ()) -> str:
    """Per-language `metric` ± its standard error for each model, the image-weighted mean (over
    the languages not in `mean_excludes`) and the chance level."""
    models, langs, _ = pivot_by_language(rows, metric)
    cells = {(r["model"], r["language"]): with_se(r[metric], r.get(f"{metric}_se")) for r in rows}
    out = [dict(language=lang, **{m: cells.get((m, lang), "") for m in models}) for lang in langs]
    mean = {m: with_se(image_weighted_mean(mine, metric), image_weighted_se(mine, metric))
            for m in models for mine in [[r for r in rows if r["model"] == m and r["language"] not in mean_excludes]]}
    label = f"mean without {', '.join(mean_excludes)}" if mean_excludes else "mean"
    out.append({"language": f"**{label} (weighted by images)**", **mean})
    if all(f"{metric}_chance" in r for r in rows):
        chance = image_weighted_mean(rows, f"{metric}_chance")
        out.append({"language": "chance", **{m: f"{chance:.4f}" for m in models}})
    return markdown_table(out, ["language", *models])


def _pyplot():
    """matplotlib's pyplot on a file backend; it comes with the trainer (`proalign[train]`)."""
    try:
        import matplotlib
    except ImportError:
        raise ProalignError("plots need matplotlib, which comes with the trainer: pip install 'proalign[train]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_languages(rows: Sequence[dict], path: str | Path, metric: str = "t2i_R@1", title: str = "") -> None:
    plt = _pyplot()
    models, langs, table = pivot_by_language(rows, metric)
    errors = {(r["model"], r["language"]): r.get(f"{metric}_se", 0.0) for r in rows}
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(langs) * max(1, len(models)) / 1.5), 4))
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(langs))]
        ax.bar(xs, [table.get((model, lang), 0.0) for lang in langs], width, label=model,
               yerr=[errors.get((model, lang), 0.0) for lang in langs], capsize=2, error_kw={"linewidth": 0.8})
    if rows and all(f"{metric}_chance" in r for r in rows):
        ax.axhline(image_weighted_mean(rows, f"{metric}_chance"), color="black", linestyle="--", linewidth=0.8,
                   label="chance")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))])
    ax.set_xticklabels(langs, rotation=60, fontsize=8)
    ax.set_ylabel(f"{metric} (± 1 s.e.)" if any(f"{metric}_se" in r for r in rows) else metric)
    ax.set_title(title or metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def coop_table(rows: Sequence[dict]) -> str:
    columns = ["language", "classes", "images", *[k for k in rows[0] if k.startswith("acc ")],
               *[k for k in rows[0] if k.startswith("gap ")]] if rows else ["language"]
    return markdown_table(rows, columns)


def coop_report(rows: Sequence[dict], table_path: str | Path, plot_path: str | Path) -> str:
    """CoOp accuracy per language (hand-written vs learned) and the cross-lingual gap."""
    text = "\n".join(["# CoOp head: zero-shot accuracy by language of the class names", "",
                       "`gap` = accuracy with English names minus accuracy with this language's names.", "",
                       coop_table(rows), ""])
    atomic_write_text(table_path, text)
    long_rows = [{"model": key[4:], "language": r["language"], "acc": r[key]}
                 for r in rows for key in r if key.startswith("acc ")]
    plot_languages(long_rows, plot_path, "acc", "CoOp: zero-shot accuracy, hand-written vs learned context")
    return text


# --------------------------------------------------------------------------- the retrieval report
RECALL_COLUMNS = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"]
DETAIL_COLUMNS = ["model", "language", "images", "captions", "truncated", *RECALL_COLUMNS, "chance t2i R@1"]


def recall_cells(row: dict) -> dict:
    """The row with each recall written as `value ± s.e.`, plus its t2i R@1 chance level."""
    cells = {**row, **{c: with_se(row[c], row.get(f"{c}_se")) for c in RECALL_COLUMNS if c in row}}
    if "t2i_R@1_chance" in row:
        cells["chance t2i R@1"] = f"{row['t2i_R@1_chance']:.4f}"
    return cells


def truncation_rows(rows: Sequence[dict]) -> list[dict]:
    """Per dataset and text tower: captions seen and captions cut at the tower's length limit."""
    totals: dict[tuple, dict] = {}
    for r in rows:
        if "truncated" in r:
            entry = totals.setdefault((r["dataset"], r["model"]), {"dataset": r["dataset"], "model": r["model"],
                                                                   "captions": 0, "truncated": 0})
            entry["captions"] += r["captions"]
            entry["truncated"] += r["truncated"]
    return list(totals.values())


def write_rows(rows: Sequence[dict], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def retrieval_sections(rows: Sequence[dict], out: Path, summary=None, summary_columns: Sequence[str] = ()) -> list[str]:
    """results.md sections for evaluator rows: per dataset, (for several languages) an optional
    `summary(rows)` table, R@1 per language both ways with a plot, then every row with ± s.e.;
    last, the captions each text tower cut."""
    parts: list[str] = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        parts += [f"## {dataset}: {max(r['images'] for r in subset)} images", ""]
        if len({r["language"] for r in subset}) > 1:
            if summary is not None:
                parts += [markdown_table(summary(subset), summary_columns), ""]
            plot = out / f"{dataset}_t2i_r1.png"
            plot_languages(subset, plot, "t2i_R@1", f"{dataset}: text→image R@1 per language")
            parts += ["Text→image R@1:", "", language_table(subset, "t2i_R@1"), "",
                      "Image→text R@1:", "", language_table(subset, "i2t_R@1"), "", f"![{dataset}]({plot.name})", "",
                      "Per language: R@1/5/10 both ways, images and captions in that language, and captions "
                      "cut at the text tower's length limit:", ""]
        parts += [markdown_table([recall_cells(r) for r in subset], DETAIL_COLUMNS), ""]
    cut = truncation_rows(rows)
    if cut:
        parts += ["## Truncated captions", "", "Captions longer than the text tower's limit (CLIP: its context "
                  "length; LLM embedder: `embedder.max_length`; CoOp: that minus the context) are cut:", "",
                  markdown_table(cut, ["dataset", "model", "captions", "truncated"]), ""]
    return parts


# ----------------------------------------------------------------------------- CoOp protocol
# One result per (shots, seed) run: {"shots", "seed", "classes", "parts": {part: [row per language]}}
# with the accuracies under these keys.
LEARNED = "acc learned context"
HANDWRITTEN = "acc hand-written"


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def _mean_accuracy(rows: list[dict], key: str) -> float:
    """Mean over languages (each language counts once, as CoOp's per-dataset means do)."""
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")


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
    plt = _pyplot()
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
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def write_protocol_report(results: list[dict], out: Path, shots: Sequence[int], seeds: Sequence[int],
                          base_to_new: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    part = "base" if base_to_new else "all"
    atomic_write_text(out / "coop_protocol.jsonl",
                      "".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))
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
    if any("in-domain" in r["parts"] for r in results):
        plot_protocol(results, "in-domain", out / "coop_protocol_in_domain.png", "CoOp in-domain: accuracy vs shots")
        parts += ["## In-domain: the training shards' images of each class that were not drawn as shots", "",
                  protocol_table(results, "in-domain"), "", "![in-domain accuracy vs shots](coop_protocol_in_domain.png)", ""]
    path = out / "coop_protocol.md"
    atomic_write_text(path, "\n".join(parts))
    print("\n".join(parts))
    return path
