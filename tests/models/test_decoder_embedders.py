"""Decoder embedders (Qwen3-shaped): last-token pooling under left padding, every stage, gradient checkpointing."""
import torch


# A small random-weight decoder with a real architecture's config (Qwen3), an instruction for the
# queries, last-token pooling and left padding: how a Qwen3-Embedding model is run.
QWEN3 = ["embedder.arch={model_type: qwen3, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
         "num_key_value_heads: 1, head_dim: 32, intermediate_size: 128, max_position_embeddings: 128}",
         "embedder.pooling=last", "embedder.instruction=Given an emoji name, retrieve the emoji"]


def _qwen3_cfg(repo_root, tmp_path, *extra):
    from proalign.config import load_config
    return load_config(repo_root / "configs" / "tiny-cpu.yaml", [f"output_dir={tmp_path / 'run'}",
                                                            f"data.cache_dir={tmp_path / 'cache'}", *QWEN3, *extra])


def test_decoder_embedder_pools_the_last_real_token_under_left_padding(repo_root, tmp_path):
    from proalign.models.embedder import TextEmbedder
    cfg = _qwen3_cfg(repo_root, tmp_path)
    embedder = TextEmbedder.from_config(cfg.embedder)
    assert type(embedder.model).__name__ == "Qwen3Model" and embedder.tokenizer.padding_side == "left"
    texts = ["cat", "a grinning face with big eyes and a wide open mouth"]
    assert embedder.prefixed(texts)[0] == "Instruct: Given an emoji name, retrieve the emoji\nQuery:cat"
    enc = embedder.tokenize(texts)
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][:, -1].all()  # padding on the left
    hidden = embedder.model(**enc).last_hidden_state
    pooled = embedder(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(pooled, hidden[:, -1])  # the last real token is the last position
    alone = torch.cat([embedder.encode([t]) for t in texts])
    assert torch.allclose(embedder.encode(texts), alone, atol=1e-5)  # padding changes nothing
    # right padding too: the pooler finds the last real token from the mask
    embedder.tokenizer.padding_side = "right"
    assert torch.allclose(embedder.encode(texts), alone, atol=1e-5)


def test_decoder_embedder_runs_cache_stage1_stage2_and_coop(repo_root, tmp_path):
    from safetensors.torch import load_file
    from proalign.models.proclip import ProCLIP
    from proalign.stages.cache import run_cache
    from proalign.stages.coop import run_coop
    from proalign.stages.stage1 import run_stage1
    from proalign.stages.stage2 import run_stage2
    cfg = _qwen3_cfg(repo_root, tmp_path, "embedder.dtype=bfloat16", "embedder.gradient_checkpointing=true",
                     "data.llm_cache_dtype=bfloat16", "stage1.train.steps=4", "stage2.train.steps=4",
                     "stage2.train.eval_every=0", "data.max_eval_samples=20", "coop.epochs=1",
                     "coop.classes_per_step=16", "coop.eval_languages=[en]")
    stats = run_cache(cfg, progress=False)
    assert stats["llm"]["shards_encoded"] == 2
    run_stage1(cfg, progress=False)
    cfg.init_from = f"{cfg.output_dir}/stage1.safetensors"
    run_stage2(cfg, progress=False)
    cfg.init_from = f"{cfg.output_dir}/stage2.safetensors"
    summary = run_coop(cfg, progress=False)
    assert summary["rows"] and load_file(f"{cfg.output_dir}/coop.safetensors")["prompt.ctx"].dtype == torch.float32
    model = ProCLIP.from_file(f"{cfg.output_dir}/coop.safetensors")
    assert next(model.embedder.parameters()).dtype == torch.bfloat16  # the file keeps the embedder's settings


def test_gradient_checkpointing_gives_the_same_context_gradient(repo_root, tmp_path):
    from proalign.models.embedder import TextEmbedder
    from proalign.models.prompt import PromptLearner
    cfg = _qwen3_cfg(repo_root, tmp_path)
    grads = []
    for checkpointing in (False, True):
        cfg.embedder.gradient_checkpointing = checkpointing
        embedder = TextEmbedder.from_config(cfg.embedder)
        torch.manual_seed(0)
        prompt = PromptLearner(embedder, 3, "end", False, ["a", "b"])
        prompt(["cat", "a dog on a skateboard"]).pow(2).sum().backward()
        grads.append(prompt.ctx.grad.clone())
        layers = [m for m in embedder.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
        assert bool(layers) == checkpointing and not any(
            m.training for m in embedder.model.modules() if isinstance(m, torch.nn.Dropout))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
