"""results.md tables and per-language bar plots."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


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


def language_table(rows: Sequence[dict], metric: str = "t2i_R@1") -> str:
    models, langs, table = pivot_by_language(rows, metric)
    out = [dict(language=lang, **{m: table.get((m, lang), float("nan")) for m in models}) for lang in langs]
    mean = {m: image_weighted_mean([r for r in rows if r["model"] == m], metric) for m in models}
    out.append({"language": "**mean (weighted by images)**", **mean})
    return markdown_table(out, ["language", *models])


def plot_languages(rows: Sequence[dict], path: str | Path, metric: str = "t2i_R@1", title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models, langs, table = pivot_by_language(rows, metric)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(langs) * max(1, len(models)) / 1.5), 4))
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(langs))]
        ax.bar(xs, [table.get((model, lang), 0.0) for lang in langs], width, label=model)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))])
    ax.set_xticklabels(langs, rotation=60, fontsize=8)
    ax.set_ylabel(metric)
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
