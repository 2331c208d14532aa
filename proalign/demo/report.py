"""The demo's report: results.md (claims, tables, plots, timings), demo_rows.jsonl, timings.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..eval.report import language_table, markdown_table, plot_languages, retrieval_sections, write_rows
from ..storage import atomic_write_text
from .claims import SIGMAS, claims, split_summary


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
    atomic_write_text(out / "results.md", "\n".join(parts))
    atomic_write_text(out / "timings.json", json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=1) + "\n")
    print("\n".join(parts))
    print(f"[demo] wrote {out / 'results.md'}")
