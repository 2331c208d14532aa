"""`proalign check`: the dry run at the configured shapes, and the paper's configs it guards."""
import pytest

from proalign.config import ConfigError, load_config

PAPER = "configs/paper/proclip-vitb16-qwen3-embedding-0.6b-3m.yaml"


def test_every_paper_config_validates_and_says_what_this_machine_lacks(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # the configs name repository files relative to it
    configs = sorted((repo_root / "configs" / "paper").glob("*.yaml"))
    assert len(configs) == 18  # 2 towers x 3 embedders x 3 sizes
    for path in configs:
        missing = []
        cfg = load_config(path, missing_files=missing)
        assert cfg.stage1.scope == cfg.stage2.scope == "local" and cfg.stage1.views == ["short", "raw"]
        assert cfg.stage1.train.optim.eps == 1e-6 and cfg.stage2.train.optim.lr == 5e-4
        assert any(item.startswith("data.train_shards: shard not found") for item in missing), path
        assert cfg.data.train_samples and cfg.embedder.arch, path
    with pytest.raises(ConfigError, match="does not exist|shard not found"):
        load_config(configs[0])  # a run on this machine needs its files


def test_check_reports_counts_cache_size_steps_and_memory(repo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    from proalign.cli import main
    assert main(["check", "--config", "configs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}",
                 "--set", "data.train_samples=1000", "--set", "data.llm_cache_dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "| CLIP image tower | 117,760 |" in out and "| adapter | 37,504 |" in out
    # 64 x bfloat16 + 64 x float32 per caption, 1000 samples x 1 caption
    assert "cache: 384 bytes per caption" in out and "1,000 samples x 1 caption(s) = 0.0 GB" in out
    assert "stage 1: ok, 37,504 trainable" in out and "stage 2: ok" in out and "micro-batch of 2 on cpu" in out


@pytest.mark.parametrize("override, message", [
    ("embedder.arch.hidden_size=1000", r"embedder.arch.hidden_size: 1000 is not a multiple of num_attention_heads 16"),
    ("data.image_size=100", r"data.image_size: 100 is not a multiple of ViT-B-16's patch size 16"),
    ("data.train_shards=[]", r"data.train_shards: required"),
    ("data.captions=[{field: caption, role: noise}]", r"data.captions\[0\].role: must be one of"),
])
def test_a_broken_paper_config_fails_naming_the_field(override, message, capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    from proalign.cli import main
    overrides = ["--set", override]
    if override.startswith("embedder.arch.hidden_size"):
        overrides += ["--set", "embedder.arch.head_dim=null"]
    assert main(["check", "--config", PAPER, "--no-steps", *overrides]) == 2
    import re
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow  # builds ViT-B/16 and a Qwen3-0.6B-shaped embedder, trains 2 + 2 steps (about a minute)
def test_check_runs_a_paper_config_at_its_shapes_on_cpu(capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    from proalign.cli import main
    assert main(["check", "--config", PAPER]) == 0
    out = capsys.readouterr().out
    assert "| CLIP image tower | 86,192,640 |" in out and "embedder (qwen3, bfloat16)" in out
    assert "stage 1: ok" in out and "stage 2: ok" in out and "not on this machine" in out
