"""Building a CLIP from an inline architecture leaves nothing in the temporary folder (one CI run
used to leave 18 `proalign_clip_cfg_*` folders behind)."""
import tempfile


def test_an_inline_clip_arch_leaves_no_temporary_files(tmp_path, monkeypatch, repo_root):
    from proalign.config import load_config
    from proalign.models.towers import create_clip
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path / 'run'}"])
    cfg.clip.model = "proalign-tiny-no-temp-files"  # a name open_clip has not seen in this process
    model, *_ = create_clip(cfg.clip)
    assert sum(p.numel() for p in model.parameters()) > 0
    # torch's own compile cache (`torchinductor_<user>`, shared and reused by every torch process) aside
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
