"""The demo's claims: each with its numbers, its gap in standard errors and its target."""
from __future__ import annotations

from typing import Optional

from ..eval.evaluator import CLIP_TOWER
from ..eval.report import HANDWRITTEN, LEARNED, image_weighted_mean, image_weighted_se, with_se
from .evalsets import LONG_SPLIT
from .examples import SEARCH_TOP_K

SIGMAS = 3.0
NON_LATIN = ("ru", "zh", "ja", "ar", "hi", "th", "uk", "el", "he", "fa", "bn", "am", "ko")


def gap_in_se(a: float, a_se: float, b: float, b_se: float) -> float:
    """(a - b) in standard errors of the difference (independent samples: a conservative
    approximation for paired ones)."""
    se = (a_se ** 2 + b_se ** 2) ** 0.5
    return (a - b) / se if se > 0 else float("inf") if a != b else 0.0


def protocol_gap(results: list[dict], part: str = "all") -> Optional[dict]:
    """Learned context vs hand-written prompt at the largest shot count, pooled over languages and
    seeds: accuracies over all (language, seed) test images of `part`, binomial standard errors."""
    if not results:
        return None
    top = max(r["shots"] for r in results)
    cells = [row for r in results if r["shots"] == top for row in r["parts"].get(part, [])]
    n = sum(row["images"] for row in cells)
    if not n:
        return None
    out = {"shots": top, "runs": sum(r["shots"] == top for r in results), "images": n}
    for key, name in ((LEARNED, "learned"), (HANDWRITTEN, "handwritten")):
        acc = sum(row[key] * row["images"] for row in cells) / n
        out[name], out[f"{name}_se"] = acc, (acc * (1 - acc) / n) ** 0.5
    return out


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
    out += _long_caption_claims(rows, evidence.get("long_names_cut") or {}, verdict)
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


HUB_SHARE = 0.05  # no image may be the first answer of more than this share of the long captions


def _long_caption_claims(rows: list[dict], names_cut: dict, verdict) -> list[str]:
    """English and non-English long captions, both directions, the final model against the CLIP text
    tower; and the share of first answers the most-chosen image takes."""
    mine = [r for r in rows if r["dataset"] == LONG_SPLIT]
    final = next((label for label in ("after stage 2", "after stage 1") if any(r["model"] == label for r in mine)), None)
    if final is None or not any(r["model"] == CLIP_TOWER for r in mine):
        return []
    cells = []
    for what, non_english in (("English", False), ("non-English", True)):
        base = [r for r in mine if r["model"] == CLIP_TOWER and (r["language"] != "en") == non_english]
        after = [r for r in mine if r["model"] == final and (r["language"] != "en") == non_english]
        if not (base and after):
            continue
        for direction, arrow in (("t2i", "text→image"), ("i2t", "image→text")):
            (a, a_se), (b, b_se) = _mean(after, f"{direction}_R@1"), _mean(base, f"{direction}_R@1")
            cells.append(f"{what} {arrow} R@1 {with_se(a, a_se)} vs {with_se(b, b_se)}: "
                         f"{verdict(gap_in_se(a, a_se, b, b_se))}")
    captions = sum(n for n, _ in names_cut.values())
    past = sum(cut for _, cut in names_cut.values())
    llm_cut = sum(r.get("truncated", 0) for r in mine if r["model"] == final)
    hub = max((r.get("t2i_top1_max_share", 0.0), r["language"]) for r in mine if r["model"] == final)
    languages = ", ".join(sorted({r["language"] for r in mine if r["language"] != "en"}))
    return [f"- Long captions, {LONG_SPLIT} ({mine[0]['images']} images; each caption is its concept's CLDR "
            f"keywords in other languages, then the name, in en and {languages}; the name lies past the CLIP text "
            f"tower's cut in {past} of {captions} captions; the LLM cut {llm_cut}), {final} vs the CLIP text tower: "
            + "; ".join(cells) + f"; the most-chosen image is the first answer of {hub[0]:.1%} of the "
            f"{hub[1]} captions, target ≤ {HUB_SHARE:.0%}: {_met(hub[0] <= HUB_SHARE)}."]
