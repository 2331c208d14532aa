"""The demo's measures: the text-only transfer measure, the long-caption construction and the
claim arithmetic (standard errors of a gap)."""
import pytest
import torch

from proalign.demo import claims, gap_in_se, long_caption_metas
from proalign.eval.text_transfer import text_transfer_rows


def _cache(feats_by_lang):
    ids, rows = [], []
    for lang, feats in feats_by_lang.items():
        for i, row in enumerate(feats):
            ids.append(f"k{i}|{lang}|0")
            rows.append(row)
    return ids, torch.stack(rows)


def test_text_transfer_finds_own_concept_and_counts_chance():
    g = torch.Generator().manual_seed(0)
    english = torch.randn(6, 4, generator=g)
    german = english + 0.01 * torch.randn(6, 4, generator=g)  # near its own English name
    clip_ids, clip_feats = _cache({"en": english, "de": torch.randn(6, 4, generator=g)})  # CLIP: unrelated
    llm_ids, llm_feats = _cache({"en": english, "de": german})
    rows = text_transfer_rows(llm_ids, llm_feats, clip_ids, clip_feats, ["de"],
                              {"tower": None, "student": lambda x: x}, "toy")
    by_model = {r["model"]: r for r in rows}
    assert by_model["student"]["t2i_R@1"] == 1.0 and by_model["student"]["concepts"] == 6
    assert by_model["student"]["t2i_R@1_chance"] == pytest.approx(1 / 6)
    assert by_model["tower"]["t2i_R@5"] <= 1.0 and by_model["student"]["t2i_R@1_se"] == 0.0


def test_long_caption_puts_english_last_and_keeps_every_language():
    metas = {"a": {"captions": {"de": ["Katze"], "en": ["cat"], "zh": ["猫"]}}, "b": {"captions": {"de": ["Hund"]}}}
    long = long_caption_metas(metas)
    assert long == {"a": {"captions": {"long": ["Katze / 猫 / cat"]}}}  # no English name: left out


def test_gap_in_standard_errors_and_verdicts():
    assert gap_in_se(0.30, 0.03, 0.10, 0.04) == pytest.approx(0.2 / 0.05)
    rows = [{"dataset": "long captions", "model": m, "language": "long", "captions": 100, "truncated": t,
             "t2i_R@1": p, "t2i_R@1_se": se} for m, p, se, t in (("CLIP text tower", 0.10, 0.03, 100),
                                                                  ("after stage 2", 0.30, 0.04, 0))]
    text = "\n".join(claims(rows, []))
    assert "**holds** (4.0 s.e.)" in text and "cut 100 of 100" in text
    rows[1]["t2i_R@1"] = 0.2
    assert "does not hold beyond 3 s.e.** (2.0 s.e.)" in "\n".join(claims(rows, []))


def test_step_clock_numbers_steps_and_scales_the_eta_by_measured_speed(monkeypatch, capsys):
    import proalign.demo as demo
    now = [1000.0]
    monkeypatch.setattr(demo.time, "time", lambda: now[0])
    clock = demo.StepClock({"a": 10.0, "b": 20.0, "c": 30.0})
    with clock("a"):
        now[0] += 20.0  # this machine is twice as slow as the reference
    assert clock.speed() == pytest.approx(2.0)
    assert clock.eta() == pytest.approx(2.0 * (20 + 30))
    with clock("b"):
        now[0] += 40.0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/3] a ... (elapsed 0:00, ETA 1:00)"
    assert lines[1] == "[1/3] a: 20 s (elapsed 0:20, ETA 1:40)"
    assert lines[-1] == "[2/3] b: 40 s (elapsed 1:00, ETA 1:00)"


def test_planned_seconds_follow_the_config_and_reuse():
    from proalign.config import load_config
    from proalign.demo import DEFAULT_CONFIG, REFERENCE_SECONDS, planned_seconds
    cfg = load_config(DEFAULT_CONFIG, ["teacher.train.steps=600"])
    assert planned_seconds(cfg, "teacher CLIP") == pytest.approx(2 * REFERENCE_SECONDS["teacher CLIP"][0])
    assert planned_seconds(cfg, "teacher CLIP", reused=True) == 0.0
    assert planned_seconds(cfg, "eval stage 1") == REFERENCE_SECONDS["eval stage 1"][0]
