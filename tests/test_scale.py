"""Scale: streamed caches (never every caption in memory), rank-split streams, storage dtypes,
frozen modules out of the training state."""
import json

import pytest
import torch

from proalign.data.cache import EmbeddingCache, PairedFeatureStream



def _caption_shards(write_shard, tmp_path, shards=3, per_shard=7):
    """JSON-only shards (stage 1 reads no images): sample k of shard s has the caption `s-k`."""
    urls = []
    for s in range(shards):
        members = [(f"x{s}-{k}.json", json.dumps({"captions": {"en": [f"{s}-{k}"]}}).encode())
                   for k in range(per_shard)]
        urls.append(str(write_shard(tmp_path / f"caps-{s:03d}.tar", members)))
    return urls


def _code(texts):
    """A row that names its caption: (shard, sample)."""
    return torch.tensor([[float(t.split("-")[0]), float(t.split("-")[1])] for t in texts])


def _paired(tmp_path, urls, dtype="float32"):
    llm = EmbeddingCache(tmp_path / "cache", "llm", "a" * 16, dtype)
    teacher = EmbeddingCache(tmp_path / "cache", "clip", "b" * 16)
    for cache in (llm, teacher):
        cache.build(urls, _code, ["en"], progress=False)
    return llm, teacher


@pytest.mark.parametrize("shards", [3, 1])  # by shard, and rows round-robin when shards < readers
def test_paired_stream_splits_every_epoch_disjointly_across_ranks(write_shard, tmp_path, monkeypatch, shards):
    import proalign.data.cache as cache_module
    urls = _caption_shards(write_shard, tmp_path, shards)
    llm, teacher = _paired(tmp_path, urls)
    total = shards * 7
    seen = []
    for rank in range(2):
        monkeypatch.setattr(cache_module, "reader_partition", lambda rank=rank: (rank, 2))
        stream = iter(PairedFeatureStream(urls, llm, teacher, ["en"], seed=1, shuffle_buffer=4))
        per_epoch = len(urls[rank::2]) * 7 if shards >= 2 else len(range(rank, 7, 2))
        rows = [next(stream) for _ in range(per_epoch)]
        assert all(torch.equal(r["llm"], r["teacher"]) for r in rows)  # the same caption's two rows
        seen.append({tuple(r["llm"].tolist()) for r in rows})
        assert len(seen[-1]) == per_epoch  # no caption twice within an epoch
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == total


def test_paired_stream_shuffles_per_epoch_and_replays_exactly(write_shard, tmp_path):
    urls = _caption_shards(write_shard, tmp_path)
    llm, teacher = _paired(tmp_path, urls)
    take = lambda n: [tuple(next(s)["llm"].tolist()) for s in [iter(PairedFeatureStream(  # noqa: E731
        urls, llm, teacher, ["en"], seed=3, shuffle_buffer=5))] for _ in range(n)]
    first, again = take(42), take(42)
    assert first == again  # the same seed gives the same order (what resume replays)
    assert sorted(first[:21]) == sorted(first[21:]) and first[:21] != first[21:]  # each epoch all, reshuffled


def test_training_never_loads_a_whole_cache(tiny_cfg, monkeypatch):
    """Stage 1 and stage 2 read the training captions shard by shard: the all-in-memory loader is
    refused for the training shards."""
    from proalign.stages.stage1 import run_stage1
    from proalign.stages.stage2 import run_stage2
    real_load = EmbeddingCache.load
    train = set(tiny_cfg.data.train_shards)

    def guarded(self, shards, languages=None):
        assert not set(shards) & train, "a training cache was loaded whole"
        return real_load(self, shards, languages)
    monkeypatch.setattr(EmbeddingCache, "load", guarded)
    tiny_cfg.stage1.train.steps = tiny_cfg.stage2.train.steps = 3
    tiny_cfg.stage2.train.eval_every = 0
    tiny_cfg.data.max_eval_samples = 10
    assert run_stage1(tiny_cfg, progress=False)["train_captions"] > 0
    tiny_cfg.init_from = f"{tiny_cfg.output_dir}/stage1.safetensors"
    run_stage2(tiny_cfg, progress=False)


def test_half_precision_cache_halves_the_bytes_and_reads_back_as_float32(write_shard, tmp_path):
    urls = _caption_shards(write_shard, tmp_path, shards=1, per_shard=200)
    wide = lambda texts: torch.randn(len(texts), 512, generator=torch.Generator().manual_seed(0))  # noqa: E731
    sizes = {}
    for dtype in ("float32", "bfloat16", "float16"):
        cache = EmbeddingCache(tmp_path / dtype, "llm", "c" * 16, dtype)
        cache.build(urls, wide, ["en"], progress=False)
        sizes[dtype] = cache.sidecar(urls[0]).stat().st_size
        ids, rows, _ = cache.load(urls, ["en"])
        assert rows.dtype == torch.float32 and rows.shape == (200, 512)
        assert torch.allclose(rows, wide(ids), rtol=1e-2, atol=1e-2)
    assert sizes["bfloat16"] < 0.52 * sizes["float32"] and sizes["float16"] < 0.52 * sizes["float32"]
    # another storage type makes the sidecar stale, never silently reinterpreted
    from proalign.data.cache import StaleCacheError
    stale = EmbeddingCache(tmp_path / "float32", "llm", "c" * 16, "bfloat16")
    with pytest.raises(StaleCacheError, match="stored as float32, not bfloat16"):
        stale.load(urls, ["en"])


def test_checkpoints_and_checksums_hold_only_what_trains(tiny_cfg):
    """The CoOp head's frozen adapter (and the embedder behind its prompt) stay out of checkpoints."""
    from proalign.models.prompt import PromptLearner
    from proalign.models.proclip import ProCLIP
    from proalign.stages.coop import CoopTask
    model = ProCLIP.from_config(tiny_cfg)
    prompt = PromptLearner(model.embedder, 2, "end", False, ["a", "b"])
    task = CoopTask(prompt, model.adapter, torch.randn(4, 64), torch.tensor([0, 1, 0, 1]), [["cat"], ["dog"]],
                    10.0, tiny_cfg.coop, 0)
    assert set(task.training_state()) == {"prompt.ctx"}
    tiny_cfg.coop.train_adapter = True
    task = CoopTask(prompt, model.adapter.requires_grad_(True), torch.randn(4, 64), torch.tensor([0, 1, 0, 1]),
                    [["cat"], ["dog"]], 10.0, tiny_cfg.coop, 0)
    assert {k.split(".")[0] for k in task.training_state()} == {"prompt", "adapter"}


def test_eval_runs_the_llm_once_per_caption_for_models_sharing_an_embedder(tiny_cfg, tmp_path, monkeypatch):
    from collections import Counter
    from proalign.config import EvalDatasetConfig
    from proalign.eval.runner import run_eval
    from proalign.models.embedder import TextEmbedder
    from proalign.models.proclip import ProCLIP
    files = {}
    for label in ("a", "b"):
        torch.manual_seed(len(files))  # two different adapters, one embedder
        files[label] = str(tmp_path / f"{label}.safetensors")
        ProCLIP.from_config(tiny_cfg).save(files[label])
    tiny_cfg.eval.models = files
    tiny_cfg.eval.datasets = [EvalDatasetConfig("emoji", "shards", "data_shards/emoji-test-000.tar",
                                                ["en", "de"], 15)]
    encoded: Counter = Counter()
    real = TextEmbedder.encode

    def counting(self, texts, *args, **kwargs):
        encoded.update(texts)
        return real(self, texts, *args, **kwargs)
    monkeypatch.setattr(TextEmbedder, "encode", counting)
    run_eval(tiny_cfg, progress=False)
    rows = [json.loads(line) for line in open(f"{tiny_cfg.output_dir}/eval_rows.jsonl")]
    assert {r["model"] for r in rows} >= {"a", "b"}
    assert encoded and max(encoded.values()) == 1  # every caption through the LLM once, for both models
    # the second model's numbers are those it gets evaluated alone
    tiny_cfg.eval.models = {"b": files["b"]}
    tiny_cfg.output_dir = str(tmp_path / "alone")
    run_eval(tiny_cfg, progress=False)
    alone = [json.loads(line) for line in open(tmp_path / "alone" / "eval_rows.jsonl")]
    key = lambda r: (r["language"], r["t2i_R@1"], r["i2t_R@1"], r["t2i_R@10"])  # noqa: E731
    assert [key(r) for r in rows if r["model"] == "b"] == [key(r) for r in alone if r["model"] == "b"]


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


class _Contrastive:
    """A toy two-tower contrastive task over fixed rows (stage 2's loss: InfoNCE + a learned scale)."""

    @staticmethod
    def make(batch_size, accum_steps, steps=2):
        from proalign.config import OptimConfig, TrainConfig
        from proalign.train import StageTask
        from proalign.models.logit_scale import LogitScale

        class Task(StageTask):
            name = "toy"

            provides = ("image", "text", "logit_scale", "student", "teacher")

            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.rows = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
                torch.manual_seed(1)
                self.image, self.text = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
                self.logit_scale = LogitScale(10.0, 100.0)
                self.objective = self.build_objective({"contrastive": 1.0, "structure": 0.5})
                self.train_cfg = TrainConfig(steps=steps, batch_size=batch_size, accum_steps=accum_steps,
                                             checkpoint_every=100, log_every=1,
                                             optim=OptimConfig(optimizer="sgd", lr=0.5, momentum=0.0, grad_clip=None))
                self.at = 0

            def next_batch(self):
                idx = torch.arange(self.at, self.at + batch_size) % 64
                self.at += batch_size
                return {"a": self.rows[0][idx], "b": self.rows[1][idx]}

            def features(self, batch):
                image, text = self.image(batch["a"]), self.text(batch["b"])
                return {"image": image, "text": text, "logit_scale": self.logit_scale(),
                        "student": image, "teacher": text.detach()}

            def loss(self, features):
                return self.objective(features)
        return Task()


def test_gradient_accumulation_equals_the_whole_batch(tiny_cfg, tmp_path):
    """2 x 8 accumulated = one batch of 16: InfoNCE negatives, structure pairs and the logit
    scale's gradient (counted once) span the accumulated batch."""
    from proalign.train import Runtime, train
    whole, accumulated = _Contrastive.make(16, 1), _Contrastive.make(8, 2)
    train(whole, Runtime.of(tiny_cfg), tmp_path / "whole", progress=False)
    train(accumulated, Runtime.of(tiny_cfg), tmp_path / "accum", progress=False)
    for (name, a), b in zip(whole.training_state().items(), accumulated.training_state().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    rows = lambda run: [json.loads(line)["loss"] for line in open(tmp_path / run / "metrics.jsonl")]  # noqa: E731
    assert rows("whole") == pytest.approx(rows("accum"), rel=1e-6)


def test_cache_build_resumes_per_shard_after_a_crash(write_shard, tmp_path):
    """A build killed in its second shard keeps the first shard's sidecar (written atomically) and
    the next build encodes only what is missing."""
    urls = _caption_shards(write_shard, tmp_path, shards=3)
    cache = EmbeddingCache(tmp_path / "cache", "llm", "d" * 16)
    calls = []

    def dies_on_second_shard(texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill
        return _code(texts)
    with pytest.raises(KeyboardInterrupt):
        cache.build(urls, dies_on_second_shard, ["en"], progress=False)
    assert sorted(p.name for p in cache.dir.iterdir()) == ["caps-000.safetensors"]
    stats = cache.build(urls, _code, ["en"], progress=False)
    assert stats["shards_reused"] == 1 and stats["shards_encoded"] == 2
    ids, rows, _ = cache.load(urls, ["en"])
    assert torch.equal(rows, _code([cid.split("|")[0][1:] for cid in ids]))
