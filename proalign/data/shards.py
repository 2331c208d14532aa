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
import re
import tarfile
from collections import Counter, deque
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from PIL import Image

from ..errors import ProalignError
from .captions import CaptionSpec, caption_items
from .images import open_rgb
from .locations import kind, open_range, open_stream, register_fsspec_readers, reported_size, seekable
from .patterns import expand_shards, shard_weights
from .stream import MAX_EMPTY_EPOCHS, Part, PartStream, ShardMemo

log = logging.getLogger(__name__)
register_fsspec_readers()
# Members webdataset leaves out of samples (`__key__`-style metadata files).
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
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
    cannot split (`..x`: dropped by webdataset without a word) or splits oddly (`k..dots.png`),
    which are skipped under `odd_member_name`."""
    def split(name: str):
        key, ext = _split_member_name(name)
        if key is None:
            skips["odd_member_name"] += 1
            log.warning("%s: skipping member %r: no sample key and extension can be read from its name", url,
                        name[:200])
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


class _ShardReader:
    """A binary stream of a shard, or of `limit` bytes of it, that counts the bytes read and feeds
    them to `digest` (a hashlib object) on the way. A read that fails (a download or pipe that
    ended with an error) ends the stream: `failed` holds the error."""

    def __init__(self, stream, digest=None, limit: Optional[int] = None):
        self.stream, self.digest, self.limit = stream, digest, limit
        self.count, self.failed = 0, None

    def read(self, size: int = -1) -> bytes:
        if self.failed is not None:
            return b""
        try:
            return self._read(size)
        except OSError as exn:
            self.failed = exn
            return b""

    def _read(self, size: int) -> bytes:
        if self.limit is not None:
            left = self.limit - self.count
            if left <= 0:
                return b""
            size = left if size is None or size < 0 else min(size, left)
        data = self.stream.read(size)
        self.count += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (its end-of-archive blocks), so the count and the digest
        cover the whole file."""
        for _ in iter(lambda: self.read(1 << 20), b""):
            pass


def _split_member_name(name: str):
    """webdataset's (sample key, extension) of a member name, or (None, None) for names it cannot
    split (`..x`) or splits oddly (`k..dots.png`: an extension starting with a dot)."""
    from webdataset.tariterators import base_plus_ext
    key, ext = base_plus_ext(name)
    if key is None or not ext or ext.startswith(".") or key.rsplit("/", 1)[-1] == "":
        return None, None
    return key, ext


def _tar_members(source, url: str, handler, base: int, trail: deque) -> Iterator[dict]:
    """The regular-file members of a tar stream as webdataset's member dicts (for its
    `group_by_keys`); each member's (name, first byte, end) in the shard goes to `trail`.
    webdataset's `tar_file_iterator` reads the same members but keeps no offsets, which reading a
    part of a shard needs. `base`: where in the shard the stream starts."""
    try:
        tar = tarfile.open(fileobj=source, mode="r|*")
        for info in tar:
            if not info.isreg() or _META_MEMBER.match(info.name):
                continue
            data = tar.extractfile(info).read()
            trail.append((info.name, base + info.offset, base + info.offset_data + -(-info.size // 512) * 512))
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # a stream's members are not kept: memory stays flat over a shard
    except Exception as exn:  # unreadable tar data, a cut stream: the handler counts it
        handler(exn)


def _sample_span(trail: deque, key: str) -> tuple[int, int]:
    """The byte range of sample `key`'s members, taken off the front of `trail` (members before
    them belong to samples left out; unsplittable names inside a sample stay in its range)."""
    start = end = None
    while trail:
        name, first, last = trail[0]
        member_key = _split_member_name(name)[0]
        if member_key == key or (member_key is None and start is not None):
            start = first if start is None else start
            end = last
        elif start is not None:
            break
        trail.popleft()
    return (start or 0), (end or 0)


def _shard_members(url: str, handler, keys, digest=None, span: Optional[tuple[int, int]] = None,
                   expected: Optional[int] = None, outcome: Optional[dict] = None) -> Iterator[dict]:
    """Samples of one shard (or of bytes [start, end) of it, `span`), members grouped by `keys`
    (webdataset's `group_by_keys`), each with its byte range as `__span__`. `digest` gets every
    byte read. `outcome["cut"]` is set when fewer bytes came than `expected` (or the span's length):
    a download or a range read that ended early."""
    from webdataset.tariterators import group_by_keys
    outcome = outcome if outcome is not None else {}
    try:
        stream = open_stream(url) if span is None else open_range(url, *span)
    except Exception as exn:  # an unreachable URL, a failing pipe: the handler counts it
        handler(exn)
        return
    limit = None if span is None else span[1] - span[0]
    source = _ShardReader(stream, digest, limit)
    trail: deque = deque()
    try:
        members = _tar_members(source, url, handler, span[0] if span else 0, trail)
        for sample in group_by_keys(members, keys=keys, handler=handler):
            sample["__span__"] = _sample_span(trail, str(sample.get("__key__", "")))
            yield sample
        source.drain()
        want = limit if limit is not None else expected
        outcome["cut"] = (want is not None and source.count < want) or source.failed is not None
        if source.failed is not None:  # e.g. curl's "partial file"
            log.warning("%s: reading it failed after %d bytes: %s", url, source.count, source.failed)
    finally:
        try:
            stream.close()
        except OSError:  # the failed read above, reported again at close
            outcome["cut"] = True


def iter_raw_samples(url: str, skips: Optional[Counter] = None, digest=None,
                     span: Optional[tuple[int, int]] = None, expected_size: Optional[int] = None) -> Iterator[dict]:
    """Raw samples (key -> bytes) of one shard, or of the byte range `span` of it, in file order,
    each with its byte range as `__span__` (`digest`, a hashlib object, gets every byte read).

    Counted skips: `truncated_shard` (the tar is cut, or a download or range read ended early:
    its samples up to the cut are read, the last one, which the cut may have split, is dropped),
    `unsafe_member_name` (an absolute or `..` member path), `corrupt_tar` (unreadable tar data),
    `odd_member_name` (a member name with no key and extension to read), `duplicate_member` (a
    member repeated within its sample) and `duplicate_key` (a sample key seen earlier in the
    shard: the first sample with it is kept, so its image and its cached captions always agree).
    A remote shard read whole is checked against the size its server reports (`expected_size`
    when the caller has it)."""
    skips = skips if skips is not None else Counter()
    local_cut = span is None and kind(url) == "file" and not tar_is_complete(url)
    if span is None and expected_size is None:
        expected_size = reported_size(url)
    outcome: dict = {}
    pending, count, seen = None, 0, set()
    for sample in _shard_members(url, _tar_handler(skips), _member_key(skips, url), digest, span, expected_size,
                                 outcome):
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
    cut = local_cut or outcome.get("cut", False)
    if pending is not None and not cut:
        count += 1
        yield pending
    if cut and (span is not None or kind(url) != "file" or os.path.getsize(url) > 0):
        skips["truncated_shard"] += 1
        where = f"{url} bytes {span[0]}-{span[1]}" if span else url
        log.warning("%s: truncated tar (%s): read %d samples up to the cut%s", where,
                    "no end-of-archive marker" if local_cut else "fewer bytes came than expected",
                    count, ", dropped the last one, which the cut may have split" if pending is not None else "")


def parse_meta(sample: dict, where: str, captions: Optional[CaptionSpec] = None) -> dict:
    """A sample's JSON metadata with its `captions` ({language: [text]}) and `caption_roles`, read
    as `captions` says (default: auto, see proalign/data/captions.py)."""
    return (captions or AUTO_CAPTIONS).read(sample, where)


def read_captions(url: str, languages: Optional[Sequence[str]] = None, skips: Optional[Counter] = None,
                  captions: Optional[CaptionSpec] = None, digest=None, spans: Optional[list] = None,
                  expected_size: Optional[int] = None):
    """[(caption_id, text)] of one shard; malformed records are skipped and counted. `spans` (a
    list) gets each sample's [key, first byte, end]: the shard's index."""
    skips = skips if skips is not None else Counter()
    items = []
    for sample in iter_raw_samples(url, skips, digest, expected_size=expected_size):
        if spans is not None:
            spans.append([sample["__key__"], *sample["__span__"]])
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


class ImageTextStream(PartStream):
    """Endless, epoch-wise deterministic stream of (image, caption_id, caption) for training,
    resumable from a saved reader position (proalign/data/stream.py). Skipped samples are yielded
    as `{"skip": reason}` so the trainer in the main process can count them.

    `shard_features(url)` (optional) gives a shard's cached text features as {sample key:
    {caption_id: row}}; each item then carries the row of its caption as `features`, read one
    shard at a time. `shard_index(url)` (optional) gives the shard's samples as [key, first byte,
    end] (its sidecar records them): parts of a shard are then read as byte ranges, and a resume
    seeks to its sample.
    """

    def __init__(self, shards, preprocess: Callable, languages: Sequence[str] = ("en",), seed: int = 0,
                 shuffle_buffer: int = 1000,
                 shard_features: Optional[Callable[[str], Mapping[str, Mapping[str, torch.Tensor]]]] = None,
                 captions: Optional[CaptionSpec] = None,
                 shard_index: Optional[Callable[[str], Optional[list]]] = None,
                 resampled: bool = False, samples_per_epoch: Optional[int] = None):
        urls = expand_shards(shards)
        super().__init__(urls, seed, shuffle_buffer, resampled=resampled, samples_per_epoch=samples_per_epoch,
                         weights=shard_weights(shards))
        self.shard_features = shard_features
        self.captions = captions
        self.preprocess = preprocess
        self.languages = list(languages)
        self._indexes = ShardMemo(shard_index, keep=4) if shard_index is not None else None

    def _spans(self, url: str) -> Optional[list]:
        """The shard's index, when it has one that can be read by byte ranges."""
        if self._indexes is None or not seekable(url):
            return None
        return self._indexes(url)

    def index_size(self, url: str) -> Optional[int]:
        spans = self._spans(url)
        return None if spans is None else len(spans)

    def read(self, part: Part, epoch: int, start: int, skips: Counter):
        features = self.shard_features(part.url) if self.shard_features else None
        spans = self._spans(part.url)
        if spans is not None and part.stride == (0, 1):
            last = len(spans) if part.last is None else part.last
            items = self._read_indexed(part.url, spans, part.first + start, last, skips)
            items = ((number - part.first, sample) for number, sample in items)
        else:
            items = self._read_strided(part, start, skips)
        for number, sample in items:
            if features is not None:
                sample["__features__"] = features.get(str(sample.get("__key__")), {})
            yield number, sample

    def _read_indexed(self, url: str, spans: list, first: int, last: int, skips: Counter):
        """(index position, sample) of samples [first, last) of the shard, read as one byte range."""
        if last <= first:
            return
        number_at = {int(spans[n][1]): n for n in range(first, last)}
        for sample in iter_raw_samples(url, skips, span=(int(spans[first][1]), int(spans[last - 1][2]))):
            number = number_at.get(sample["__span__"][0])
            if number is None or spans[number][0] != sample["__key__"]:
                skips["not_in_cache_index"] += 1  # a sample the cache left out (a duplicate key across the range)
                continue
            yield number, sample

    def _read_strided(self, part: Part, start: int, skips: Counter):
        """(sample number in the shard, sample) of every stride-th sample, reading the shard whole."""
        offset, step = part.stride
        counted: Counter = Counter()  # skips before `start` were counted when those samples were read
        for number, sample in enumerate(iter_raw_samples(part.url, counted)):
            if number >= start:
                skips.update(counted)
            counted.clear()
            if number >= start and number % step == offset:
                yield number, sample
        skips.update(counted)

    def fetch(self, part: Part, epoch: int, wanted: set, skips: Counter) -> dict:
        spans = self._spans(part.url)
        if spans is None or part.stride != (0, 1):
            return super().fetch(part, epoch, wanted, skips)
        found, run = {}, []
        for number in sorted(wanted) + [None]:  # consecutive samples are read as one range
            if run and (number is None or number != run[-1] + 1):
                piece = Part(part.url, part.first + run[0], part.first + run[-1] + 1)
                found.update({n + run[0]: sample for n, sample in self.read(piece, epoch, 0, skips)})
                run = []
            if number is not None:
                run.append(number)
        return found

    def decode(self, sample: dict, rng: random.Random) -> dict:
        try:
            items = caption_items(parse_meta(sample, "stream", self.captions), sample["__key__"], self.languages)
        except ValueError:  # json.JSONDecodeError is a ValueError
            return {"skip": "bad_json"}
        if not items:
            return {"skip": "no_caption"}
        caption_id, text = items[rng.randrange(len(items))]
        # Random augmentation is seeded per sample from the sample's own RNG, so it depends on the
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

    def empty_error(self, reader: int, readers: int, skipped: Counter) -> Exception:
        return EmptyStreamError(
            f"no usable sample in {MAX_EMPTY_EPOCHS} passes over {len(self.urls)} shard(s) "
            f"({', '.join(self.urls[:5])}{', ...' if len(self.urls) > 5 else ''}) for reader {reader} of "
            f"{readers}; skipped: {dict(skipped) or 'nothing was read'}")
