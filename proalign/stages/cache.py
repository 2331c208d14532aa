"""`proalign cache`: encode every caption once with the frozen LLM embedder and the CLIP text
teacher, into one sidecar file per shard under `data.cache_dir` (default `<output_dir>/cache`)."""
from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import RunConfig
from ..data.cache import CachedTextFeatures, EmbeddingCache, PairedFeatureStream, ViewFeatureStream
from ..data.captions import CaptionSpec
from ..distributed import rank_and_world
from ..models.deferred import DeferredEmbedder, read_record, write_record
from ..models.proclip import ProCLIP
from ..models.towers import context_length, count_truncated, encode_clip_text, text_tower_fingerprint


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "cache")


def llm_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    return EmbeddingCache(cache_root(cfg), "llm", model.embedder.fingerprint(), cfg.data.llm_cache_dtype,
                          CaptionSpec(cfg.data.captions))


def teacher_cache(cfg: RunConfig, model: ProCLIP) -> EmbeddingCache:
    """The CLIP text tower's caption features, keyed by the text tower's weights alone: a LiT
    teacher's cache serves its own training, then stage 1, and survives the image tower's training."""
    return EmbeddingCache(cache_root(cfg), "clip", text_tower_fingerprint(model.clip),
                          captions=CaptionSpec(cfg.data.captions))


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


def build_caches(cfg: RunConfig, model: ProCLIP, teacher: bool = True, progress: bool = True,
                 llm: bool = True, parts: Optional[list] = None, verify: bool = False) -> dict:
    """Encode the captions once with the LLM embedder (`llm`) and the CLIP text teacher (`teacher`),
    over `parts` ((shards, languages) pairs; default `cache_languages(cfg)`).

    Under torchrun/DeepSpeed every rank encodes its own disjoint share of the shards (`rank::world`
    of the sorted list), then all ranks wait for each other; the returned counts are totals over
    ranks (`per_rank` keeps this rank's own). `verify`: every cached shard is read whole and
    compared with the SHA-256 its sidecar recorded (`proalign cache --verify`)."""
    from ..train.backends import resolve_device
    rank, world = rank_and_world()
    parts = cache_languages(cfg) if parts is None else parts
    if llm and isinstance(model.embedder, DeferredEmbedder) and not model.embedder.built:
        cache = llm_cache(cfg, model)
        missing = [url for shards, languages in parts for url in _my_shards(shards, rank, world)
                   if cache._check(url, languages, verify_content=verify) is not None]
        if missing:
            model.embedder.materialize(f"{len(missing)} shard(s) lack its cache (first: {missing[0]})")
        else:
            llm = False  # every caption of this rank's shards is cached: the embedder stays unbuilt
    bs = cfg.embedder.batch_size
    stats: dict = {"llm": Counter(), "clip": Counter()}
    ctx, tok = context_length(model.clip), model.clip_tokenizer
    device = resolve_device(cfg.device)
    was_training = model.clip.training
    model.clip.eval()
    encoders = ([model.embedder] if llm else []) + ([model.clip] if teacher else [])
    with _on_device(encoders, device):
        for shards, languages in parts:
            if llm:
                stats["llm"].update(llm_cache(cfg, model).build(
                    shards, lambda texts: model.embedder.encode(texts, batch_size=bs, progress=False), languages,
                    progress=progress, rank=rank, world=world, verify=verify))
            if teacher:
                stats["clip"].update(teacher_cache(cfg, model).build(
                    shards, lambda texts: encode_clip_text(model.clip, tok, texts, device=device), languages,
                    extra=lambda texts: {"truncated": count_truncated(tok, texts, ctx)}, progress=progress,
                    rank=rank, world=world, verify=verify))
    if world > 1:
        import torch.distributed as dist
        dist.barrier()  # every rank's sidecars are written before anyone reads them
    model.clip.train(was_training)
    stats = {k: dict(v) for k, v in stats.items() if v}
    if llm:
        stats["embedder_truncated"] = model.embedder.truncated_count
        if rank == 0:
            write_record(cache_root(cfg), cfg.embedder, model.embedder)
    if world > 1:
        stats = {**_sum_over_ranks(stats), "per_rank": stats, "ranks": world}
    return stats


@contextlib.contextmanager
def _stop_with_a_message():
    """SIGTERM or SIGINT during `proalign cache`: stop at once (every sidecar is written whole, so
    nothing is lost but the shard in progress) and say how to continue."""
    import signal
    import threading
    from ..train import TrainingInterrupted
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise TrainingInterrupted(f"cache: stopped by {signal.Signals(signum).name}; every shard finished so far is "
                                  "cached. Run the same command again to continue from there", signum)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _my_shards(shards, rank: int, world: int) -> list[str]:
    """This rank's share of `shards`, as `EmbeddingCache.build` takes it."""
    from ..data.shards import expand_shards
    return sorted(expand_shards(shards))[rank::world]


def training_model(cfg: RunConfig) -> ProCLIP:
    """The stage's model; its embedder is deferred (built only if a caption is missing from the
    cache) when a cache build already recorded it (models/deferred.py)."""
    record = read_record(cache_root(cfg), cfg.embedder)
    if record is None:
        return ProCLIP.from_config(cfg)
    return ProCLIP.from_config(cfg, embedder=DeferredEmbedder(cfg.embedder, record))


def embedder_built(model: ProCLIP) -> bool:
    """Whether this process built the embedder (a deferred one is built only for missing captions)."""
    embedder = model.embedder
    return embedder is not None and (not isinstance(embedder, DeferredEmbedder) or embedder.built)


@contextlib.contextmanager
def _on_device(modules, device: torch.device):
    """The encoders run on the run's device while caching, then go back where they were (a frozen
    8B embedder does not stay on the GPU for the training that follows)."""
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes):
            module.to(home)


def _sum_over_ranks(stats: dict) -> dict:
    """Every count summed over the ranks (after the last rank has written its sidecars)."""
    import torch.distributed as dist
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    total: dict = {}
    for part in gathered:
        for key, value in part.items():
            if isinstance(value, dict):
                bucket = total.setdefault(key, Counter())
                bucket.update(value)
            else:
                total[key] = total.get(key, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


def run_cache(cfg: RunConfig, progress: bool = True, verify: bool = False) -> dict:
    """`proalign cache`: join the process group when launched by torchrun/DeepSpeed, build this
    rank's share of the caches, report the totals on rank 0."""
    from .common import join_run
    join_run(cfg)
    torch.manual_seed(cfg.seed)
    model = ProCLIP.from_config(cfg)
    start = time.perf_counter()
    with _stop_with_a_message():
        stats = build_caches(cfg, model, progress=progress, verify=verify)
    stats["seconds"] = time.perf_counter() - start  # encoding and the wait for the other ranks
    rank, world = rank_and_world()
    if rank == 0:
        print(f"cache: {json.dumps(stats)}")
    return stats


def paired_stream(cfg: RunConfig, model: ProCLIP, shards, languages, seed: int) -> PairedFeatureStream:
    """The cached (LLM, teacher) rows of the same captions, streamed shard by shard: every caption
    its own row, or with `stage1.views` one caption per view and sample."""
    if cfg.stage1.views:
        return ViewFeatureStream(shards, llm_cache(cfg, model), teacher_cache(cfg, model), languages,
                                 cfg.stage1.views, seed, cfg.data.shuffle_buffer, cfg.data.resampled,
                                 cfg.data.samples_per_epoch)
    return PairedFeatureStream(shards, llm_cache(cfg, model), teacher_cache(cfg, model), languages, seed,
                               cfg.data.shuffle_buffer, cfg.data.resampled, cfg.data.samples_per_epoch)


def shard_text_features(cfg: RunConfig, model: ProCLIP, shards, languages, kind: str = "llm") -> "ShardTextFeatures":
    """url -> {sample key: {caption id: cached row}} for the image-text stream, after checking
    that every shard's sidecar is current: the LLM's rows (`llm`, stage 2) or the CLIP text
    tower's (`clip`, the LiT teacher). Its `index(url)` is the shard's index from the same sidecar."""
    cache = {"llm": llm_cache, "clip": teacher_cache}[kind](cfg, model)
    cache.verify(shards, languages)
    return ShardTextFeatures(cache, languages)


class ShardTextFeatures:
    """A cache's rows of one shard at a time, by sample, and the shard's index (each sample's
    byte range, recorded by `proalign cache`), both read from the shard's sidecar."""

    def __init__(self, cache: EmbeddingCache, languages):
        self.cache, self.languages = cache, list(languages)

    def __call__(self, url: str) -> dict:
        return self.cache.rows_by_sample(url, self.languages)

    def index(self, url: str):
        return self.cache.sample_spans(url)


def cached_llm_features(cfg: RunConfig, model: ProCLIP, shards: Sequence[str], languages,
                        live_fallback: bool = True) -> CachedTextFeatures:
    """The cached LLM rows of a bounded (evaluation) set by caption id; captions not in the cache
    are encoded live (`live_fallback`) or are an error."""
    ids, feats, _ = llm_cache(cfg, model).load(shards, languages)
    encode = (lambda texts: model.embedder.encode(texts)) if live_fallback and model.embedder is not None else None
    return CachedTextFeatures(ids, feats, encode, what="llm cache")
