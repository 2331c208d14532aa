"""Read image-text webdataset shards.

Sample: `<key>.{jpg,png}` + `<key>.json` holding `{"captions": {"en": [...], "de": [...]}, "label": ...}`,
or the layouts of img2dataset and multi-caption shards (`data.captions`, proalign/data/captions.py).
Corrupt images, unreadable JSON and samples without a usable caption are skipped and counted,
never a crash mid-epoch. Splitting: shards across ranks/workers when there are enough of them,
otherwise samples round-robin, so every rank sees a disjoint part of each epoch.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..distributed import rank_and_world
from ..errors import ProalignError
from .captions import CaptionSpec, caption_items
from .images import open_rgb
from .locations import open_stream, register_fsspec_readers
from .patterns import expand_shards  # noqa: F401  (re-exported: the readers' home for shard lists)

log = logging.getLogger(__name__)
register_fsspec_readers()
# An endless stream stops after this many passes in a row without one usable sample (zero-byte
# shards, every image corrupt) instead of spinning forever.
MAX_EMPTY_PASSES = 2
AUTO_CAPTIONS = CaptionSpec()
# Image members of a shard sample, and image files in a folder, in order of preference.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def _tar_handler(counter: Counter):
    def handler(exn: Exception) -> bool:
        if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
            # a sample's member repeated right after it (`k.jpg k.json k.jpg ...`): the first is kept
            counter["duplicate_member"] += 1
            log.warning("skipping a repeated member of one sample: %s", str(exn.args[0])[:200])
            return True
        counter["corrupt_tar"] += 1
        log.warning("skipping unreadable shard data: %s", exn)
        return True
    return handler


def _member_key(skips: Counter, url: str):
    """webdataset's split of a member name into (sample key, extension), counting the names it
    cannot split (`..x`: dropped by webdataset without a word) or splits oddly (`k..dots.png`: an
    extension starting with a dot), which are skipped under `odd_member_name`."""
    from webdataset.tariterators import base_plus_ext

    def split(name: str):
        key, ext = base_plus_ext(name)
        if key is None or not ext or ext.startswith(".") or key.rsplit("/", 1)[-1] == "":
            skips["odd_member_name"] += 1
            log.warning("%s: skipping member %r: no sample key and extension can be read from its name", url,
                        name[:200])
            return None, None
        return key, ext
    return split


class DuplicateKeyError(ProalignError, ValueError):
    """A sample key in two shards of one eval set; names both shards and the key."""


class EmptyStreamError(ProalignError, RuntimeError):
    """The training shards gave no usable sample; the message names the shards and the skips."""


def tar_is_complete(path: str) -> bool:
    """A whole tar ends with its end-of-archive marker (two zero 512-byte blocks) on a block
    boundary; one cut mid-member, or after a member, does not. Python's tar reader in stream
    mode reads such a file to the cut without an error."""
    size = os.path.getsize(path)
    if size == 0 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def _unsafe_key(key: str) -> bool:
    """Absolute (`/x`, `C:/x`) or parent-relative (`../x`) member paths."""
    path = key.replace("\\", "/")
    drive = len(path) > 2 and path[0].isalpha() and path[1:3] == ":/"
    return path.startswith("/") or drive or ".." in path.split("/")


class _HashingReader:
    """A binary stream that feeds every byte read through it to `digest`."""

    def __init__(self, stream, digest):
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (its end-of-archive blocks), so the digest covers the file."""
        for block in iter(lambda: self.read(1 << 20), b""):
            pass


def _shard_members(url: str, handler, keys, digest=None) -> Iterator[dict]:
    """webdataset's tar reading (members grouped into samples by `keys`) over one shard's stream;
    with `digest`, every byte of the shard goes through it on the way (no second read)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander
    try:
        stream = open_stream(url)
    except Exception as exn:  # an unreachable URL, a failing pipe: the handler counts it
        handler(exn)
        return
    source = _HashingReader(stream, digest) if digest is not None else stream
    try:
        yield from group_by_keys(tar_file_expander(iter([{"url": url, "stream": source}]), handler=handler),
                                 keys=keys, handler=handler)
        if digest is not None:
            source.drain()
    finally:
        stream.close()


def iter_raw_samples(url: str, skips: Optional[Counter] = None, digest=None) -> Iterator[dict]:
    """Raw samples (key -> bytes) of one shard, in file order (`digest`, a hashlib object, gets
    every byte of the shard as it is read).

    Counted skips: `truncated_shard` (the tar is cut: its samples up to the cut are read, the
    last one, which the cut may have split, is dropped), `unsafe_member_name` (an absolute or
    `..` member path), `corrupt_tar` (unreadable tar data), `odd_member_name` (a member name
    with no key and extension to read), `duplicate_member` (a member repeated within its sample)
    and `duplicate_key` (a sample key seen earlier in the shard: the first sample with it is kept,
    so its image and its cached captions always agree)."""
    skips = skips if skips is not None else Counter()
    truncated = "://" not in url and not url.startswith("pipe:") and not tar_is_complete(url)
    pending, count, seen = None, 0, set()
    for sample in _shard_members(url, _tar_handler(skips), _member_key(skips, url), digest):
        key = str(sample.get("__key__", ""))
        if _unsafe_key(key):
            skips["unsafe_member_name"] += 1
            log.warning("%s: skipping sample with unsafe member name %r", url, sample.get("__key__"))
            continue
        if key in seen:
            skips["duplicate_key"] += 1
            log.warning("%s: skipping a second sample with key %r (the first one is kept)", url, key[:200])
            continue
        seen.add(key)
        if pending is not None:
            count += 1
            yield pending
        pending = sample
    if pending is not None and not truncated:
        count += 1
        yield pending
    if truncated and os.path.getsize(url) > 0:
        skips["truncated_shard"] += 1
        log.warning("%s: truncated tar (no end-of-archive marker): read %d samples up to the cut%s", url, count,
                    ", dropped the last one, which the cut may have split" if pending is not None else "")


def parse_meta(sample: dict, where: str, captions: Optional[CaptionSpec] = None) -> dict:
    """A sample's JSON metadata with its `captions` ({language: [text]}) and `caption_roles`, read
    as `captions` says (default: auto, see proalign/data/captions.py)."""
    return (captions or AUTO_CAPTIONS).read(sample, where)


def read_captions(url: str, languages: Optional[Sequence[str]] = None, skips: Optional[Counter] = None,
                  captions: Optional[CaptionSpec] = None, digest=None):
    """[(caption_id, text)] of one shard; malformed records are skipped and counted."""
    skips = skips if skips is not None else Counter()
    items = []
    for sample in iter_raw_samples(url, skips, digest):
        try:
            meta = parse_meta(sample, url, captions)
        except (ValueError, json.JSONDecodeError) as err:
            skips["bad_json"] += 1
            log.warning("%s", err)
            continue
        found = caption_items(meta, sample["__key__"], languages)
        if not found:
            skips["no_caption"] += 1
        items.extend(found)
    return items


def decode_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return open_rgb(sample[ext], f"{sample.get('__url__', 'shard')}: {sample.get('__key__')}.{ext}")
    raise ValueError("no image member")


def load_image_text(urls: Sequence[str], preprocess: Callable, languages: Optional[Sequence[str]] = None,
                    max_samples: Optional[int] = None, skips: Optional[Counter] = None,
                    captions: Optional[CaptionSpec] = None):
    """Eval-time loader: (images tensor, [key], {key: meta}) with all captions kept. Captions are
    matched to images by sample key across the set, so a key in two shards is refused
    (`DuplicateKeyError` naming both); a key repeated within a shard is a counted skip."""
    skips = skips if skips is not None else Counter()
    images, keys, metas = [], [], {}
    first_shard: dict[str, str] = {}
    for url in urls:
        for sample in iter_raw_samples(url, skips):
            if max_samples and len(keys) >= max_samples:
                break
            key = sample["__key__"]
            if key in first_shard:
                raise DuplicateKeyError(f"sample key {key!r} is in two shards of one eval set ({first_shard[key]} and "
                                        f"{url}): its captions could not be told apart; give the samples unique keys")
            first_shard[key] = url
            try:
                meta = parse_meta(sample, url, captions)
                image = preprocess(decode_image(sample))
            except Exception as err:  # counted skip: corrupt image or record
                skips["bad_sample"] += 1
                log.warning("%s: skipping %s: %s", url, sample.get("__key__"), err)
                continue
            images.append(image)
            keys.append(sample["__key__"])
            metas[sample["__key__"]] = meta
    return (torch.stack(images) if images else torch.empty(0)), keys, metas


def reader_partition() -> tuple[int, int]:
    """(this reader's index, reader count): rank r of W and DataLoader worker k of K."""
    rank, world = rank_and_world()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return rank * workers + worker, world * workers


def epoch_shards(urls: Sequence[str], seed: int, epoch: int, index: int, count: int):
    """(this reader's shards in epoch order, whether they are split by shard, the reader's RNG).

    Epoch e shuffles the shards with seed (seed, e). With at least as many shards as readers each
    reader takes every count-th shard; otherwise every reader reads all shards and keeps every
    count-th sample (the caller's job), so the readers' parts stay disjoint either way."""
    rng = random.Random(seed * 1_000_003 + epoch)
    urls = list(urls)
    rng.shuffle(urls)
    by_shard = len(urls) >= count
    mine = urls[index::count] if by_shard else urls
    return mine, by_shard, random.Random(rng.random() + index)


def shuffle_buffered(items: Iterable, rng: random.Random, size: int) -> Iterator:
    """`items` through a shuffle buffer of `size` (once full, a random one leaves for each one that
    enters), then what is left, shuffled: a stream's order within an epoch, from `rng` alone."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class ImageTextStream(IterableDataset):
    """Endless, epoch-wise deterministic stream of (image, caption_id, caption) for training.

    Epoch e shuffles shards and samples with seed (seed, e); rank r of W and worker k of K take
    disjoint parts. Resuming replays the same order and skips `start_sample` samples (documented
    deterministic resampling rather than stored reader offsets). Skipped samples are yielded as
    `{"skip": reason}` so the trainer in the main process can count them.

    `shard_features(url)` (optional) gives a shard's cached text features as {sample key:
    {caption_id: row}}; each item then carries the row of its caption as `features`, read one
    shard at a time.
    """

    def __init__(self, shards, preprocess: Callable, languages: Sequence[str] = ("en",), seed: int = 0,
                 shuffle_buffer: int = 1000,
                 shard_features: Optional[Callable[[str], Mapping[str, Mapping[str, torch.Tensor]]]] = None,
                 captions: Optional[CaptionSpec] = None):
        super().__init__()
        self.shard_features = shard_features
        self.captions = captions
        self.urls = expand_shards(shards)
        self.preprocess = preprocess
        self.languages = list(languages)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_epoch = 0

    def _partition(self) -> tuple[int, int]:
        return reader_partition()

    def _epoch(self, epoch: int) -> Iterator[dict]:
        index, count = self._partition()
        mine, by_shard, sample_rng = epoch_shards(self.urls, self.seed, epoch, index, count)
        skips: Counter = Counter()

        def samples() -> Iterator[dict]:
            position = 0
            for url in mine:
                # this shard's cached text features, each sample carrying its own rows into the buffer
                features = self.shard_features(url) if self.shard_features else None
                for sample in iter_raw_samples(url, skips):
                    position += 1
                    if not by_shard and (position - 1) % count != index:
                        continue
                    if features is not None:
                        sample["__features__"] = features.get(str(sample.get("__key__")), {})
                    yield sample
        yield from shuffle_buffered(samples(), sample_rng, self.shuffle_buffer)
        for reason, n in skips.items():
            for _ in range(n):
                yield {"skip": reason}

    def _decode(self, sample: dict, rng: random.Random) -> dict:
        if "skip" in sample:
            return sample
        try:
            items = caption_items(parse_meta(sample, "stream", self.captions), sample["__key__"], self.languages)
        except ValueError:  # json.JSONDecodeError is a ValueError
            return {"skip": "bad_json"}
        if not items:
            return {"skip": "no_caption"}
        caption_id, text = items[rng.randrange(len(items))]
        # Random augmentation is seeded per sample from the stream's RNG, so it depends on the
        # sample's place in the epoch only: not on workers, skipped samples or a resume.
        aug_seed = rng.getrandbits(62)
        # default_generator directly: torch.manual_seed() costs ~0.8 ms per call (dynamo guard
        # + CUDA seeding), a third of the per-sample time.
        saved = torch.default_generator.get_state()
        torch.default_generator.manual_seed(aug_seed)
        try:
            image = self.preprocess(decode_image(sample))
        except Exception:
            return {"skip": "bad_image"}
        finally:
            torch.default_generator.set_state(saved)
        item = {"image": image, "caption_id": caption_id, "text": text}
        if "__features__" in sample:
            row = sample["__features__"].get(caption_id)
            if row is None:
                raise KeyError(f"caption {caption_id} has no row in its shard's embedding cache; rebuild it with "
                               f"`proalign cache`")
            item["features"] = row
        return item

    def __iter__(self):
        epoch = self.start_epoch
        empty_passes = 0
        while True:
            index, count = self._partition()
            rng = random.Random(f"{self.seed}-{epoch}-{index}")
            usable, skipped = 0, Counter()
            for sample in self._epoch(epoch):
                item = self._decode(sample, rng)
                if "skip" in item:
                    skipped[item["skip"]] += 1
                else:
                    usable += 1
                yield item
            empty_passes = 0 if usable else empty_passes + 1
            if empty_passes >= MAX_EMPTY_PASSES:
                raise EmptyStreamError(
                    f"no usable sample in {empty_passes} passes over {len(self.urls)} shard(s) "
                    f"({', '.join(self.urls[:5])}{', ...' if len(self.urls) > 5 else ''}) for reader {index} of "
                    f"{count}; skipped: {dict(skipped) or 'nothing was read'}")
            epoch += 1


def collate(items: list[dict]) -> dict:
    """Tensors stacked, everything else listed, field by field."""
    return {key: torch.stack([i[key] for i in items]) if isinstance(items[0][key], torch.Tensor)
            else [i[key] for i in items] for key in items[0]}


class _BatchedStream(IterableDataset):
    """Collates inside each worker (one IPC transfer per batch, not per sample); every batch
    carries the skip counts met while filling it. Items are dicts, or `{"skip": reason}`."""

    def __init__(self, stream: IterableDataset, batch_size: int):
        super().__init__()
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self):
        items, skips = [], Counter()
        for item in self.stream:
            if "skip" in item:
                skips[item["skip"]] += 1
                continue
            items.append(item)
            if len(items) == self.batch_size:
                yield {**collate(items), "skips": dict(skips)}
                items, skips = [], Counter()


class Batcher:
    """Batches from the stream (collated in the DataLoader workers), counting skips.

    The batch order is deterministic for a given seed, world size and `num_workers` (the
    DataLoader takes worker batches round-robin), so a resume replays it and drops the
    `start_sample // batch_size` batches already trained on."""

    def __init__(self, stream: IterableDataset, batch_size: int, num_workers: int = 0, start_sample: int = 0):
        from torch.utils.data import DataLoader
        self.batch_size = batch_size
        self.skips: Counter = Counter()
        loader = DataLoader(_BatchedStream(stream, batch_size), batch_size=None, num_workers=num_workers,
                            persistent_workers=num_workers > 0)
        self.iterator = iter(loader)
        self.consumed = 0  # samples handed out so far (the resume position)
        if start_sample % batch_size:
            log.warning("resume position %d is not a multiple of the batch size %d; rounding down",
                        start_sample, batch_size)
        for _ in range(start_sample // batch_size):
            self.next_batch()

    def next_batch(self) -> dict:
        batch = next(self.iterator)
        for reason, count in batch.pop("skips").items():
            self.skips[reason] += count
        self.consumed += self.batch_size
        return batch
