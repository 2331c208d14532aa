"""`proalign check`: the dry run at the configured shapes, and the paper's configs it guards."""
import pytest
import torch

from proalign.config import ConfigError, load_config

PAPER = "configs/paper/proclip-vitb16-qwen3-embedding-0.6b-3m.yaml"


def test_every_paper_config_validates_and_is_what_its_generator_writes(repo_root, monkeypatch):
    """Each committed paper config loads (its absent cluster files listed, not raised) and is the
    output of tools/paper_configs.py as it stands, so an edit to one side alone fails here."""
    import importlib.util
    import yaml
    monkeypatch.chdir(repo_root)  # the configs name repository files relative to it
    spec = importlib.util.spec_from_file_location("paper_configs", repo_root / "tools" / "paper_configs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = {f"proclip-{t}-{e}-{s}.yaml": generator.config(t, e, s)
                for t in generator.TOWERS for e in generator.EMBEDDERS for s in generator.DATA}
    configs = sorted((repo_root / "configs" / "paper").glob("*.yaml"))
    assert sorted(p.name for p in configs) == sorted(expected)
    for path in configs:
        assert yaml.safe_load(path.read_text()) == expected[path.name], f"{path.name}: run tools/paper_configs.py"
        missing = []
        load_config(path, missing_files=missing)
        assert any(item.startswith("data.train_shards: shard not found") for item in missing), path
    with pytest.raises(ConfigError, match="does not exist|shard not found"):
        load_config(configs[0])  # a run on this machine needs its files


def test_check_reports_counts_cache_size_steps_and_memory(repo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    from proalign.cli import main
    assert main(["check", "--config", "configs/tiny-cpu.yaml", "--set", f"output_dir={tmp_path}",
                 "--set", "data.train_samples=1000", "--set", "data.llm_cache_dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    from proalign.models.proclip import ProCLIP
    model = ProCLIP.from_config(load_config("configs/tiny-cpu.yaml", [f"output_dir={tmp_path}"]))
    image, adapter = (sum(p.numel() for p in m.parameters()) for m in (model.clip.visual, model.adapter))
    assert f"| CLIP image tower | {image:,} |" in out and f"| adapter | {adapter:,} |" in out
    llm_width, clip_width = model.embedder.dim, model.adapter(torch.zeros(1, model.embedder.dim)).shape[-1]
    per_caption = 2 * llm_width + 4 * clip_width  # a bfloat16 LLM row and a float32 CLIP row
    assert f"cache: {per_caption} bytes per caption" in out and "1,000 samples x 1 caption(s)" in out
    assert f"stage 1: ok, {adapter:,} trainable" in out and "stage 2: ok" in out and "micro-batch of 2 on cpu" in out


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
    import open_clip
    image = sum(p.numel() for p in open_clip.create_model("ViT-B-16", device="meta").visual.parameters())
    assert f"| CLIP image tower | {image:,} |" in out and "embedder (qwen3, bfloat16)" in out
    assert "stage 1: ok" in out and "stage 2: ok" in out and "not on this machine" in out
