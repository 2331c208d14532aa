"""results.md tables and per-language bar plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence


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


def plot_languages(rows: Sequence[dict], path: str | Path, metric: str = "t2i_R@1", title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(path, dpi=120)
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
    Path(table_path).write_text(text)
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
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


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
