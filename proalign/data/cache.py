"""Sidecar embedding cache for frozen encoders (the LLM embedder, the CLIP text teacher).

Layout: `<cache_dir>/<kind>-<fingerprint>/<shard-stem>-<location digest>.safetensors`, one file
per shard, named by the shard's whole location (resolved path or URL, proalign/data/locations.py),
holding an `embeddings` matrix whose rows follow the caption ids stored in its metadata. The
fingerprint hashes model + prefix + max length (or the teacher's weights), so a different
encoder never reads another's cache. Each file records its shard's location and identity (size
and mtime; ETag / Last-Modified / Content-Length remotely), so a rebuilt or edited shard makes its
sidecar stale without any shard being read at start-up; it also records a SHA-256 of the shard's
bytes, checked only when asked (`proalign cache --verify`), and the shard's index: each
sample's key and byte range, by which a shard's readers split it and a resume seeks.
Files are written atomically per shard, so an interrupted `build` resumes where it stopped, and
two builds on one cache never leave a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open

from ..errors import ProalignError
from ..storage import save_tensors
from .captions import CaptionId, CaptionSpec, caption_role
from . import locations
from .patterns import shard_weights
from .shards import expand_shards, read_captions
from .stream import Part, PartStream, ShardMemo

log = logging.getLogger(__name__)
CACHE_VERSION = "5"
# All of a sidecar's metadata sits under this one key, as sorted JSON: safetensors stores its
# metadata in a hash map, whose order (and so the file's bytes) would differ between processes.
META_KEY = "proalign_cache"


# Rows kept for texts that repeat across shards within one build (see EmbeddingCache.build).
MEMO_BYTES = 256 * 2 ** 20


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's stored bytes (any dtype): a sidecar's rows are checked against it."""
    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def read_sidecar_meta(handle) -> dict:
    """The metadata of an open sidecar ({} for a file without proalign's metadata: stale)."""
    raw = (handle.metadata() or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def _first_non_finite_row(rows: torch.Tensor) -> Optional[int]:
    """The index of the first row holding a NaN or an infinity, or None."""
    if not rows.numel() or torch.isfinite(rows).all():
        return None
    return int((~torch.isfinite(rows)).reshape(len(rows), -1).any(1).nonzero()[0])


class StaleCacheError(ProalignError, RuntimeError):
    pass


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# metadata keys every sidecar has; any other key is an extra summed by `load` (the teacher's truncations)
_BASE_KEYS = ("version", "fingerprint", "shard", "shard_identity", "shard_sha256", "samples", "skips", "languages",
              "ids", "dtype", "tensor_sha256", "captions", "spans")


class _Unusable(Exception):
    """A sidecar that cannot be used; the message says why and names the file."""


class EmbeddingCache:
    """The sidecars of one encoder. `dtype` is the storage type of the rows (float16/bfloat16 halve
    the bytes of wide LLM features); rows are read back as float32."""

    def __init__(self, root: str | Path, kind: str, fingerprint: str, dtype: str = "float32",
                 captions: Optional[CaptionSpec] = None):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        self.dir = Path(root) / f"{kind}-{fingerprint}"
        self.kind, self.fingerprint, self.dtype = kind, fingerprint, dtype
        # which captions of a sample are read (data.captions): the caption ids depend on it
        self.captions = captions or CaptionSpec()

    def sidecar(self, url: str) -> Path:
        return self.dir / f"{locations.cache_name(url)}.safetensors"

    def _check(self, url: str, languages: Optional[Sequence[str]] = None, verify_rows: bool = False,
               verify_content: bool = False) -> Optional[str]:
        """None if the sidecar of `url` is present, readable, current and holds `languages` (None:
        all), else why not. The shard is described, not read (`locations.identity`);
        `verify_content` also reads it whole and compares its SHA-256. `verify_rows` also reads the
        rows and checks them against their checksum (`build` does; training checks each sidecar's
        rows when it reads them)."""
        path = self.sidecar(url)
        if not path.exists():
            return "missing"
        try:
            meta, stored = self._read(path, with_rows=verify_rows)
        except _Unusable as err:
            return str(err)
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != self.fingerprint:
            return "written by another encoder version"
        if meta.get("dtype", "float32") != self.dtype:
            return f"stored as {meta.get('dtype', 'float32')}, not {self.dtype}"
        if meta.get("captions", "auto") != self.captions.key:
            return "its captions were read from other caption fields (data.captions changed)"
        if meta.get("shard") != locations.canonical(url):
            return f"written for another shard ({meta.get('shard')})"
        if meta.get("shard_identity") != locations.identity(url):
            return "its shard changed since it was cached"
        if verify_content and meta.get("shard_sha256") != locations.content_digest(url):
            return "its shard's bytes changed since it was cached (--verify)"
        cached = json.loads(meta.get("languages", "null"))
        if cached is not None and (languages is None or not set(languages) <= set(cached)):
            return f"cached for languages {cached}, not {sorted(languages) if languages else 'all'}"
        return None

    @staticmethod
    def _read(path: Path, with_rows: bool = True) -> tuple[dict, Optional[torch.Tensor]]:
        """(metadata, stored rows or None) of a sidecar; `_Unusable` naming the file when it cannot be
        read or its rows do not match the checksum written with them."""
        from safetensors import SafetensorError
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = read_sidecar_meta(f)
                stored = f.get_tensor("embeddings") if with_rows else None
        except (SafetensorError, OSError, json.JSONDecodeError) as err:
            raise _Unusable(f"unreadable ({path}: {err})") from None
        expected = meta.get("tensor_sha256")
        if stored is not None and expected is not None and tensor_digest(stored) != expected:
            raise _Unusable(f"corrupted ({path}: its rows do not match the checksum written with them)")
        row = _first_non_finite_row(stored) if stored is not None else None
        if row is not None:
            raise _Unusable(f"not finite ({path}: row {row} holds NaN or infinite values)")
        return meta, stored

    def build(self, shards, encode: Callable[[list[str]], torch.Tensor], languages: Optional[Sequence[str]] = None,
              extra: Optional[Callable[[list[str]], dict]] = None, progress: bool = True,
              rank: int = 0, world: int = 1, memo_bytes: int = MEMO_BYTES, verify: bool = False) -> dict:
        """Encode every caption of this rank's shards not yet cached. Returns counts.

        Rank r of W takes every W-th shard of the sorted shard list, so the ranks' parts are
        disjoint. A text repeated within a shard is encoded once; a text repeated across this
        rank's shards reuses its row from the first shard while it stays in a bounded memo
        (`memo_bytes` of rows, least recently used out first; 0 turns it off). A reused row
        equals a fresh encoding up to float rounding (other batch neighbours), so sidecars are
        byte-identical to a one-process build when no caption text spans shards of two ranks.
        `verify` re-reads every cached shard whole and re-encodes those whose bytes changed."""
        from tqdm.auto import tqdm
        self.dir.mkdir(parents=True, exist_ok=True)
        memo = _RowMemo(memo_bytes)
        stats: Counter = Counter()
        urls = sorted(expand_shards(shards))[rank::world]
        where = f" [rank {rank}/{world}]" if world > 1 else ""
        bar = tqdm(urls, desc=f"cache {self.kind}{where}", disable=not progress, unit="shard")
        for url in bar:
            reason = self._check(url, languages, verify_rows=True, verify_content=verify)
            if reason is None:
                stats["shards_reused"] += 1
                continue
            if reason != "missing":
                log.warning("re-encoding %s: cache %s", url, reason)
            skips: Counter = Counter()
            shard_identity = locations.identity(url)  # before the read: a change during it is seen next time
            digest = hashlib.sha256()  # of the shard's bytes as they are read: no second read
            spans: list = []
            items = read_captions(url, languages, skips, self.captions, digest, spans,
                                  locations.reported_size(url, shard_identity))
            stats.update(skips)
            ids = [i for i, _ in items]
            texts = [t for _, t in items]
            unique = list(dict.fromkeys(texts))
            rows = {t: row for t in unique if (row := memo.get(t)) is not None}
            fresh = [t for t in unique if t not in rows]
            if fresh:
                rows.update(zip(fresh, encode(fresh)))
                for text in fresh:
                    memo.put(text, rows[text])
            stats["texts_encoded"] += len(fresh)
            stats["texts_reused"] += len(unique) - len(fresh)
            emb = torch.stack([rows[t] for t in texts]) if texts else torch.empty(0, 0)
            samples = len({CaptionId.parse(cid).key for cid in ids})
            if skips:
                log.info("%s: %d samples with captions; skipped %s", url, samples, dict(skips))
            meta = {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "shard": locations.canonical(url),
                    "shard_identity": shard_identity, "shard_sha256": digest.hexdigest(),
                    "samples": str(samples), "skips": json.dumps(dict(skips)), "dtype": self.dtype,
                    "languages": json.dumps(sorted(languages) if languages else None),
                    "ids": json.dumps(ids, ensure_ascii=False), "spans": json.dumps(spans, ensure_ascii=False)}
            if self.captions.fields:
                meta["captions"] = self.captions.key
            if extra:
                meta.update({k: json.dumps(v) for k, v in extra(texts).items()})
            stored = emb.float().to(STORAGE_DTYPES[self.dtype])
            row = _first_non_finite_row(stored)
            if row is not None:
                raise ProalignError(f"{url}: the {self.kind} encoder gave NaN or infinite values for caption "
                                    f"{ids[row]!r} ({texts[row][:80]!r}); nothing was cached for this shard")
            meta["tensor_sha256"] = tensor_digest(stored)
            save_tensors({"embeddings": stored}, self.sidecar(url),
                         {META_KEY: json.dumps(meta, sort_keys=True, ensure_ascii=False)})
            stats["shards_encoded"] += 1
            stats["captions_encoded"] += len(ids)
            bar.set_postfix(captions=stats["captions_encoded"])
        return dict(stats)

    def verify(self, shards, languages: Optional[Sequence[str]] = None) -> None:
        """Raise StaleCacheError naming the first shards whose sidecar is missing or stale."""
        bad = [(url, reason) for url in expand_shards(shards) if (reason := self._check(url, languages))]
        if bad:
            listed = "; ".join(f"{url}: {reason}" for url, reason in bad[:3])
            raise StaleCacheError(f"embedding cache ({self.dir}) is not current for {len(bad)} shard(s) ({listed}"
                                  f"{'; ...' if len(bad) > 3 else ''}): run `proalign cache`")

    def _require_current(self, url: str, languages: Optional[Sequence[str]]) -> None:
        reason = self._check(url, languages)
        if reason is not None:
            raise StaleCacheError(f"embedding cache for {url} is {reason}: run `proalign cache` "
                                  f"(cache dir {self.dir})")

    def shard_rows(self, url: str, languages: Optional[Sequence[str]] = None,
                   checked: bool = False) -> tuple[list[str], torch.Tensor, dict]:
        """(caption ids, float32 rows, metadata) of one shard's sidecar, only `languages` (None: all)."""
        if not checked:
            self._require_current(url, languages)
        try:
            meta, stored = self._read(self.sidecar(url))
        except _Unusable as err:
            raise StaleCacheError(f"embedding cache for {url} is {err}: run `proalign cache` to re-encode it "
                                  f"(cache dir {self.dir})") from None
        emb = stored.float()
        ids = json.loads(meta["ids"])
        if languages:
            keep = [i for i, cid in enumerate(ids) if _language(cid) in languages]
            ids = [ids[i] for i in keep]
            emb = emb[keep] if len(keep) else emb[:0]
        return ids, emb, meta

    def sample_spans(self, url: str) -> Optional[list]:
        """The shard's index from its sidecar: [key, first byte, end] of each sample, in file order
        (None when the sidecar has none). The sidecar is checked by the caller."""
        with safe_open(str(self.sidecar(url)), framework="pt") as f:
            spans = read_sidecar_meta(f).get("spans")
        return json.loads(spans) if spans else None

    def rows_by_sample(self, url: str, languages: Optional[Sequence[str]] = None) -> dict[str, dict]:
        """{sample key: {caption id: row}} of one shard (the image-text stream reads training
        features this way, shard by shard). Each sample's rows are copied out of the shard's
        matrix, so a sample waiting in a shuffle buffer keeps its own rows alive, not its shard's."""
        ids, emb, _ = self.shard_rows(url, languages, checked=True)
        by_key: dict[str, list[int]] = {}
        for row, cid in enumerate(ids):
            by_key.setdefault(CaptionId.parse(cid).key, []).append(row)
        return {key: dict(zip((ids[r] for r in rows), emb[rows].unbind())) for key, rows in by_key.items()}

    def load(self, shards, languages: Optional[Sequence[str]] = None) -> tuple[list[str], torch.Tensor, dict]:
        """(caption ids, embeddings, extras) of the given shards, all in memory: for bounded sets
        (evaluation); training streams them shard by shard. Extras: the extra metadata summed over
        shards, plus `shard_samples` (samples each shard gave) and `skips` (summed skip counts)."""
        ids: list[str] = []
        mats, tally = [], _Tally()
        for url in expand_shards(shards):
            shard_ids, emb, meta = self.shard_rows(url, languages)
            tally.add(meta)
            if len(shard_ids):
                ids.extend(shard_ids)
                mats.append(emb)
        matrix = torch.cat(mats) if mats else torch.empty(0)
        return ids, matrix, tally.result()

    def summary(self, shards, languages: Optional[Sequence[str]] = None) -> dict:
        """`load`'s extras from the sidecars' metadata alone (no rows), plus `captions`."""
        tally, captions = _Tally(), 0
        for url in expand_shards(shards):
            self._require_current(url, languages)
            with safe_open(str(self.sidecar(url)), framework="pt") as f:
                meta = read_sidecar_meta(f)
            ids = json.loads(meta["ids"])
            captions += sum(_language(cid) in languages for cid in ids) if languages else len(ids)
            tally.add(meta)
        return {**tally.result(), "captions": captions}


class _RowMemo:
    """text -> encoded row across the shards of one build, bounded in bytes (LRU): at scale few
    captions repeat across shards and the memo stays small; a demo's names repeated across drawing
    styles and test splits are encoded once."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict
        self.rows: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.max_bytes, self.bytes = max_bytes, 0

    def get(self, text: str) -> Optional[torch.Tensor]:
        row = self.rows.get(text)
        if row is not None:
            self.rows.move_to_end(text)
        return row

    def put(self, text: str, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size()
        if size > self.max_bytes:
            return
        self.rows[text] = row.clone()  # not a view: the batch's matrix is not kept alive
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.rows.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _language(caption_id: str) -> str:
    return CaptionId.parse(caption_id).language


def paired_rows(llm: "EmbeddingCache", teacher: "EmbeddingCache", url: str, languages: Optional[Sequence[str]],
                checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's (LLM rows, teacher rows) of the same captions, in the same order."""
    ids_l, llm_rows, _ = llm.shard_rows(url, languages, checked)
    ids_t, teacher_rows, _ = teacher.shard_rows(url, languages, checked)
    if ids_l != ids_t:
        raise StaleCacheError(f"{url}: the LLM and CLIP caches disagree on caption ids; rebuild them with "
                              f"`proalign cache`")
    return llm_rows, teacher_rows


class _Tally:
    """Per-shard metadata summed over shards: extra counts, skips, samples per shard."""

    def __init__(self):
        self.extras, self.skips, self.shard_samples = Counter(), Counter(), {}

    def add(self, meta: dict) -> None:
        self.shard_samples[meta["shard"]] = int(meta["samples"])
        self.skips.update(json.loads(meta["skips"]))
        for key, value in meta.items():
            if key not in _BASE_KEYS:
                self.extras[key] += json.loads(value)

    def result(self) -> dict:
        return {**self.extras, "shard_samples": self.shard_samples, "skips": dict(self.skips)}


class PairedFeatureStream(PartStream):
    """Endless, epoch-wise shuffled stream of {"llm": row, "teacher": row} over cached captions,
    read one shard's sidecars at a time (stage 1): never every caption in memory. Partitioned,
    shuffled and resumable as every training stream (proalign/data/stream.py); an item is a
    cached caption, and a shard's rows are its index, so a shard with several readers is split
    by rows."""

    def __init__(self, shards, llm: "EmbeddingCache", teacher: "EmbeddingCache", languages: Sequence[str],
                 seed: int = 0, shuffle_buffer: int = 10_000, resampled: bool = False,
                 samples_per_epoch: Optional[int] = None):
        super().__init__(expand_shards(shards), seed, shuffle_buffer, resampled=resampled,
                         samples_per_epoch=samples_per_epoch, weights=shard_weights(shards))
        self.llm, self.teacher, self.languages = llm, teacher, list(languages)
        self._items = ShardMemo(self._load, keep=2)  # the shard's items, read from its sidecars
        for cache in (llm, teacher):
            cache.verify(self.urls, self.languages)

    def _load(self, url: str) -> list:
        llm, teacher = paired_rows(self.llm, self.teacher, url, self.languages, checked=True)
        return list(zip(llm.unbind(), teacher.unbind()))

    def index_size(self, url: str) -> int:
        return len(self._items(url))

    def read(self, part: Part, epoch: int, start: int, skips: Counter):
        """The part's items in an order shuffled with seed (seed, epoch, shard, first item)."""
        items = self._items(part.url)
        numbers = list(range(part.first, len(items) if part.last is None else part.last))
        random.Random(f"{self.seed}-{epoch}-{part.url}-{part.first}").shuffle(numbers)
        for number in range(start, len(numbers)):
            yield number, items[numbers[number]]

    def decode(self, raw, rng) -> dict:
        llm, teacher = raw
        # copies: a view would keep the whole shard's matrix alive while it waits in the buffer
        return {"llm": llm.clone(), "teacher": teacher.clone()}

    def empty_error(self, reader: int, readers: int, skipped: Counter) -> Exception:
        return StaleCacheError(f"no cached caption in {len(self.urls)} shard(s) ({', '.join(self.urls[:3])}) for "
                               f"languages {self.languages}" + (f"; skipped: {dict(skipped)}" if skipped else ""))


class ViewFeatureStream(PairedFeatureStream):
    """Stage 1 with views (`stage1.views`, the reference's): per sample, one cached caption of each
    view's role (short, long, raw), drawn per epoch with the stream's seed, as {"llm": (V, D),
    "teacher": (V, D')}. A sample without a caption of some view is a counted skip
    (`no_<role>_caption`). Partitioned and shuffled like `PairedFeatureStream`, by sample."""

    def __init__(self, shards, llm: "EmbeddingCache", teacher: "EmbeddingCache", languages: Sequence[str],
                 views: Sequence[str], seed: int = 0, shuffle_buffer: int = 10_000, resampled: bool = False,
                 samples_per_epoch: Optional[int] = None):
        super().__init__(shards, llm, teacher, languages, seed, shuffle_buffer, resampled, samples_per_epoch)
        self.views = list(views)

    def _load(self, url: str) -> list:
        llm, teacher = self.llm.rows_by_sample(url, self.languages), self.teacher.rows_by_sample(url, self.languages)
        return [(llm[key], teacher[key]) for key in sorted(llm)]

    def decode(self, raw, rng) -> dict:
        llm, teacher = raw
        picked = []
        for role in self.views:
            ids = sorted(cid for cid in llm if caption_role(cid) == role)
            if not ids:
                return {"skip": f"no_{role}_caption"}
            picked.append(ids[rng.randrange(len(ids))])
        return {"llm": torch.stack([llm[cid] for cid in picked]), "teacher": torch.stack([teacher[cid] for cid in picked])}


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
