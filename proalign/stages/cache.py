"""`proalign cache`: encode every caption once with the frozen LLM embedder and the CLIP text
teacher, into one sidecar file per shard under `data.cache_dir` (default `<output_dir>/cache`)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import RunConfig
from ..data.cache import CachedTextFeatures, EmbeddingCache
from ..models.proclip import ProCLIP
from ..models.towers import context_length, count_truncated, encode_clip_text, module_fingerprint


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "cache")


def llm_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    return EmbeddingCache(cache_root(cfg), "llm", model.embedder.fingerprint())


def teacher_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    return EmbeddingCache(cache_root(cfg), "clip", module_fingerprint(model.clip))


def eval_languages(cfg: RunConfig) -> Optional[list[str]]:
    """The languages the eval caches hold: `data.eval_languages` plus the training ones (None: all)."""
    if not cfg.data.eval_languages:
        return None
    return sorted(set(cfg.data.eval_languages) | set(cfg.data.train_languages))


def cache_languages(cfg: RunConfig) -> list[tuple[list[str], Optional[list[str]]]]:
    """(shards, languages) to encode: the training shards in the training languages, the eval
    shards in `eval_languages(cfg)`."""
    train = list(cfg.data.train_shards)
    evals = [s for s in cfg.data.eval_shards if s not in train]
    return [(shards, langs) for shards, langs in ((train, list(cfg.data.train_languages)), (evals, eval_languages(cfg)))
            if shards]


def build_caches(cfg: RunConfig, model: ProCLIP, teacher: bool = True, progress: bool = True) -> dict:
    """Encode the captions once with the LLM embedder and (optionally) the CLIP text teacher."""
    bs = cfg.embedder.batch_size
    stats: dict = {"llm": Counter(), "clip": Counter()}
    ctx, tok = context_length(model.clip), model.clip_tokenizer
    model.clip.eval()
    for shards, languages in cache_languages(cfg):
        stats["llm"].update(llm_cache(cfg, model).build(
            shards, lambda texts: model.embedder.encode(texts, batch_size=bs, progress=False), languages,
            progress=progress))
        if teacher:
            stats["clip"].update(teacher_cache(cfg, model).build(
                shards, lambda texts: encode_clip_text(model.clip, tok, texts), languages,
                extra=lambda texts: {"truncated": count_truncated(tok, texts, ctx)}, progress=progress))
    stats = {k: dict(v) for k, v in stats.items() if v}
    stats["embedder_truncated"] = model.embedder.truncated_count
    return stats


def paired_features(cfg: RunConfig, model: ProCLIP, shards, languages) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(LLM rows, teacher rows, extras) of the same captions, in the same order."""
    ids_l, llm, _ = llm_cache(cfg, model).load(shards, languages)
    ids_t, clip, extra = teacher_cache(cfg, model).load(shards, languages)
    if ids_l != ids_t:
        raise RuntimeError("LLM and CLIP caches disagree on caption ids; rebuild with `proalign cache`")
    return llm, clip, extra


def cached_llm_features(cfg: RunConfig, model: ProCLIP, shards: Sequence[str], languages,
                        live_fallback: bool = True) -> CachedTextFeatures:
    """The cached LLM rows of `shards` by caption id; captions not in the cache are encoded live
    (`live_fallback`) or are an error."""
    ids, feats, _ = llm_cache(cfg, model).load(shards, languages)
    encode = (lambda texts: model.embedder.encode(texts)) if live_fallback and model.embedder is not None else None
    return CachedTextFeatures(ids, feats, encode, what="llm cache")
