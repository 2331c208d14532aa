"""Sidecar embedding cache for frozen encoders (the LLM embedder, the CLIP text teacher).

Layout: `<cache_dir>/<kind>-<fingerprint>/<shard-stem>.safetensors`, one file per shard, holding
an `embeddings` matrix whose rows follow the caption ids stored in its metadata. The
fingerprint hashes model + prefix + max length (or the teacher's weights), so a different
encoder never reads another's cache; each file also records its shard's size and a SHA-256 of
its bytes, so a rebuilt or edited shard (even one of the same size) makes its sidecar stale
(detected, re-encoded by `build`, an error in `load`).
Files are written atomically per shard, so an interrupted `build` resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open

from ..errors import ProalignError
from ..storage import save_tensors
from .shards import expand_shards, read_captions

log = logging.getLogger(__name__)
CACHE_VERSION = "2"
_digests: dict[tuple, str] = {}


def shard_digest(url: str) -> str:
    """SHA-256 of a shard's bytes, memoised per (path, size, mtime) within the process."""
    stat = Path(url).stat()
    key = (str(Path(url).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(url, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


class StaleCacheError(ProalignError, RuntimeError):
    pass


class EmbeddingCache:
    def __init__(self, root: str | Path, kind: str, fingerprint: str):
        self.dir = Path(root) / f"{kind}-{fingerprint}"
        self.kind, self.fingerprint = kind, fingerprint

    def sidecar(self, url: str) -> Path:
        name = Path(url).name
        stem = name[:-4] if name.endswith(".tar") else name
        return self.dir / f"{stem}.safetensors"

    def _check(self, url: str, languages: Optional[Sequence[str]] = None) -> Optional[str]:
        """None if the sidecar of `url` is present, current and holds `languages` (None: all), else why not."""
        path = self.sidecar(url)
        if not path.exists():
            return "missing"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != self.fingerprint:
            return "written by another encoder version"
        if meta.get("shard_size") != str(Path(url).stat().st_size) or meta.get("shard_sha256") != shard_digest(url):
            return "its shard changed since it was cached"
        cached = json.loads(meta.get("languages", "null"))
        if cached is not None and (languages is None or not set(languages) <= set(cached)):
            return f"cached for languages {cached}, not {sorted(languages) if languages else 'all'}"
        return None

    def build(self, shards, encode: Callable[[list[str]], torch.Tensor], languages: Optional[Sequence[str]] = None,
              extra: Optional[Callable[[list[str]], dict]] = None, progress: bool = True,
              memo_bytes: int = 256 * 2**20) -> dict:
        """Encode every caption of every shard not yet cached. Returns counts.

        A text repeated within or across the shards of this call (a concept drawn in several
        styles, the same names in two test splits) is encoded once: the embeddings of texts already
        seen are kept, up to `memo_bytes`, and reused."""
        from tqdm.auto import tqdm
        self.dir.mkdir(parents=True, exist_ok=True)
        stats: Counter = Counter()
        urls = expand_shards(shards)
        memo: dict[str, torch.Tensor] = {}
        memo_used = 0
        for url in tqdm(urls, desc=f"cache {self.kind}", disable=not progress, unit="shard"):
            reason = self._check(url, languages)
            if reason is None:
                stats["shards_reused"] += 1
                continue
            if reason != "missing":
                log.warning("re-encoding %s: cache %s", url, reason)
            skips: Counter = Counter()
            items = read_captions(url, languages, skips)
            stats.update(skips)
            ids = [i for i, _ in items]
            texts = [t for _, t in items]
            fresh = list(dict.fromkeys(t for t in texts if t not in memo))
            if fresh:
                known = dict(zip(fresh, encode(fresh).float()))
                stats["texts_encoded"] += len(fresh)
            else:
                known = {}
            for text, row in known.items():
                if memo_used + row.numel() * 4 <= memo_bytes:
                    memo[text] = row
                    memo_used += row.numel() * 4
            emb = torch.stack([known[t] if t in known else memo[t] for t in texts]) if texts else torch.empty(0, 0)
            samples = len({cid.rsplit("|", 2)[0] for cid in ids})
            if skips:
                log.info("%s: %d samples with captions; skipped %s", url, samples, dict(skips))
            meta = {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "shard": Path(url).name,
                    "shard_size": str(Path(url).stat().st_size), "shard_sha256": shard_digest(url),
                    "samples": str(samples), "skips": json.dumps(dict(skips)),
                    "languages": json.dumps(sorted(languages) if languages else None),
                    "ids": json.dumps(ids, ensure_ascii=False)}
            if extra:
                meta.update({k: json.dumps(v) for k, v in extra(texts).items()})
            save_tensors({"embeddings": emb.float()}, self.sidecar(url), meta)
            stats["shards_encoded"] += 1
            stats["captions_encoded"] += len(ids)
        return dict(stats)

    def load(self, shards, languages: Optional[Sequence[str]] = None) -> tuple[list[str], torch.Tensor, dict]:
        """(caption ids, embeddings, extras) for the given shards: the extra metadata summed over
        shards, plus `shard_samples` (samples each shard gave) and `skips` (summed skip counts)."""
        ids: list[str] = []
        mats, extras, skips, shard_samples = [], Counter(), Counter(), {}
        for url in expand_shards(shards):
            reason = self._check(url, languages)
            if reason is not None:
                raise StaleCacheError(f"embedding cache for {url} is {reason}: run `proalign cache` "
                                      f"(cache dir {self.dir})")
            with safe_open(str(self.sidecar(url)), framework="pt") as f:
                meta = f.metadata()
                emb = f.get_tensor("embeddings")
            shard_ids = json.loads(meta["ids"])
            shard_samples[meta["shard"]] = int(meta["samples"])
            skips.update(json.loads(meta["skips"]))
            for key, value in meta.items():
                if key not in ("version", "fingerprint", "shard", "shard_size", "shard_sha256", "samples", "skips",
                               "languages", "ids"):
                    extras[key] += json.loads(value)
            if languages:
                keep = [i for i, cid in enumerate(shard_ids) if cid.split("|")[-2] in languages]
                shard_ids = [shard_ids[i] for i in keep]
                emb = emb[keep] if len(keep) else emb[:0]
            if len(shard_ids):
                ids.extend(shard_ids)
                mats.append(emb)
        matrix = torch.cat(mats) if mats else torch.empty(0)
        return ids, matrix, {**extras, "shard_samples": shard_samples, "skips": dict(skips)}


class CachedTextFeatures:
    """Caption id -> cached embedding, encoding the captions the cache lacks with `encode_missing`
    (texts -> rows) and keeping them. Stage 2 and the evaluators read LLM features through this."""

    def __init__(self, ids: Sequence[str], feats: torch.Tensor,
                 encode_missing: Optional[Callable[[list[str]], torch.Tensor]] = None, what: str = "cache"):
        self.rows = dict(zip(ids, feats))
        self.encode_missing, self.what = encode_missing, what

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, ids: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        rows = [self.rows.get(i) for i in ids]
        missing = [k for k, r in enumerate(rows) if r is None]
        if missing:
            if self.encode_missing is None:
                raise KeyError(f"{self.what}: caption {ids[missing[0]]} is not in the embedding cache")
            fresh = self.encode_missing([texts[k] for k in missing])
            for k, row in zip(missing, fresh):
                rows[k] = self.rows[ids[k]] = row
        return torch.stack(rows)
