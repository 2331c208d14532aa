"""An embedder that is built only when something needs it.

Training reads the LLM's caption features from the embedding cache, so a stage whose cache is
complete never runs the embedder: at the paper's 8B embedders, building it on every rank costs
16 GB of memory per rank for nothing. When `proalign cache` (or a stage's own cache build) runs
the real embedder, it writes an *embedder record* beside the caches: what identifies the cache
(the fingerprint), the feature width the adapter needs, and the probe embeddings a model file
records. `DeferredEmbedder` answers those from the record and builds the real embedder the first
time anything else is asked of it (a caption the cache lacks, live evaluation), saying so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch.nn as nn

from ..config import EmbedderConfig
from ..storage import atomic_write_text

log = logging.getLogger(__name__)

RECORD_VERSION = 1
# Fields that do not change what the embedder computes: not part of a record's key.
_NOT_IN_KEY = ("batch_size", "max_build_gb", "gradient_checkpointing")
# A record is a few kB of JSON (the probe: 4 texts x width); anything far larger is not one.
MAX_RECORD_BYTES = 8 << 20


def record_key(cfg: EmbedderConfig) -> str:
    """A digest of the embedder settings that change its output."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def record_path(cache_root: Path, cfg: EmbedderConfig) -> Path:
    return Path(cache_root) / "embedders" / f"{record_key(cfg)}.json"


def write_record(cache_root: Path, cfg: EmbedderConfig, embedder) -> None:
    """What a built embedder's cache needs later without it (written once per embedder settings)."""
    path = record_path(cache_root, cfg)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"version": RECORD_VERSION, "fingerprint": embedder.fingerprint(),
                                        "dim": embedder.dim, "probe": embedder.probe()}) + "\n")


def read_record(cache_root: Path, cfg: EmbedderConfig) -> Optional[dict]:
    """The record of these embedder settings, or None (absent, unreadable or malformed: the
    embedder is then built as usual)."""
    path = record_path(cache_root, cfg)
    try:
        if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (isinstance(record, dict) and record.get("version") == RECORD_VERSION
          and isinstance(record.get("fingerprint"), str) and isinstance(record.get("dim"), int)
          and record["dim"] > 0 and isinstance(record.get("probe"), list))
    if not ok:
        log.warning("%s: not an embedder record proalign wrote; the embedder is built", path)
    return record if ok else None


class DeferredEmbedder(nn.Module):
    """Stands in for a `TextEmbedder`: `dim`, `fingerprint()`, `probe()` and `truncated_count` come
    from the record; anything else builds the real embedder first (once) and asks it."""

    def __init__(self, cfg: EmbedderConfig, record: dict):
        super().__init__()
        self.cfg, self.record = cfg, record
        self.real: Optional[nn.Module] = None

    @property
    def built(self) -> bool:
        return self._modules.get("real") is not None

    def materialize(self, why: str = "") -> nn.Module:
        real = self._modules.get("real")
        if real is None:
            from .embedder import TextEmbedder
            log.info("building the embedder%s", f": {why}" if why else "")
            real = TextEmbedder.from_config(self.cfg)  # on an RNG of its own: the run's stream is unchanged
            if real.fingerprint() != self.record["fingerprint"]:
                log.warning("the embedder built now differs from the one its cache record names "
                            "(fingerprint %s, record %s)", real.fingerprint(), self.record["fingerprint"])
            self.real = real
        return real

    @property
    def dim(self) -> int:
        return int(self.record["dim"])

    def fingerprint(self) -> str:
        return self.record["fingerprint"] if not self.built else self.real.fingerprint()

    def probe(self) -> list[float]:
        return list(self.record["probe"]) if not self.built else self.real.probe()

    @property
    def truncated_count(self) -> int:
        return self.real.truncated_count if self.built else 0

    def forward(self, *args, **kwargs):
        return self.materialize("its features are needed")(*args, **kwargs)

    def encode(self, texts, *args, **kwargs):
        return self.materialize(f"{len(texts)} caption(s) are not in the cache").encode(texts, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("cfg", "record", "real"):
                raise
        return getattr(self.materialize(f"`{name}` was asked of it"), name)
