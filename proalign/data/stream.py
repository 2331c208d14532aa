"""Resumable, partitioned training streams: how every stage reads its training data (image-text
shards in stage 2 and the teacher, cached features in stage 1).

Each of R readers (rank r of W, DataLoader worker k of K: R = W x K) reads its own *parts* of an
epoch (a whole shard, or a range of the items of one) through a shuffle buffer. Every random
choice is drawn from a seed of (run seed, epoch, reader, counter), never from a running RNG, so a
reader's position is a few numbers: its epoch, the part and item it reads next, how many items it
has given out, and which items wait in its buffer. Checkpoints store that position; a resume
re-reads the buffered items and goes on from the next item (a seek, not a replay of the epoch).

Splitting: with at least as many shards as readers, each reader takes every R-th shard of the
epoch's shuffled list. With fewer, the readers of one shard each take a contiguous range of its
items, read as a byte range when the shard's index (from its sidecar) is known: each byte is
read once per epoch either way. Without an index (no cache, a `pipe:` shard) a shard's readers
read it whole and keep every n-th item (said once).

Resampled epochs (`data.resampled`): each reader draws whole shards with replacement, in
proportion to their source's weight, until it has read its share of `data.samples_per_epoch`.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from torch.utils.data import IterableDataset, get_worker_info

from ..distributed import rank_and_world
from ..errors import ProalignError

log = logging.getLogger(__name__)
# An endless stream stops after this many epochs in a row without one usable item (zero-byte
# shards, every image corrupt) instead of spinning forever.
MAX_EMPTY_EPOCHS = 2


@dataclass(frozen=True)
class Part:
    """A reader's piece of one shard in one epoch: items [first, last) of the shard's index
    (`last` None: to its end), or, with no index, every `stride[1]`-th item from `stride[0]`."""
    url: str
    first: int = 0
    last: Optional[int] = None
    stride: tuple = (0, 1)


class ReaderLayoutError(ProalignError, ValueError):
    """A saved reader position that belongs to another reader layout."""


def _seed(*parts) -> random.Random:
    return random.Random("-".join(str(p) for p in parts))


class ShardMemo:
    """What a stream derives from a shard (its index, its cached rows), kept for the last `keep`
    shards: a part re-reads its shard's on resume and across parts, never more than `keep` held."""

    def __init__(self, make: Callable[[str], object], keep: int):
        self.make, self.keep, self.held = make, keep, {}

    def __call__(self, url: str):
        if url not in self.held:
            if len(self.held) >= self.keep:
                self.held.pop(next(iter(self.held)))
            self.held[url] = self.make(url)
        return self.held[url]


def plan_epoch(urls: Sequence[str], seed: int, epoch: int, reader: int, readers: int,
               index_size: Callable[[str], Optional[int]]) -> list[Part]:
    """This reader's parts of epoch `epoch` (shards shuffled with seed (seed, epoch); see the
    module's docstring for the split)."""
    order = list(urls)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if len(order) >= readers:
        return [Part(url) for url in order[reader::readers]]
    shard = reader % len(order)
    sharers = len(range(shard, readers, len(order)))
    share = reader // len(order)
    size = index_size(order[shard])
    if size is None:
        return [Part(order[shard], stride=(share, sharers))]
    first, last = size * share // sharers, size * (share + 1) // sharers
    return [Part(order[shard], first, last)] if last > first else []


class PartStream(IterableDataset):
    """The resumable stream; subclasses say how to read a part (`read`), how to turn a raw item
    into a training item (`decode`) and how many items a shard's index holds (`index_size`)."""

    def __init__(self, urls: Sequence[str], seed: int, shuffle_buffer: int, *, resampled: bool = False,
                 samples_per_epoch: Optional[int] = None, weights: Optional[dict] = None):
        super().__init__()
        self.urls = list(urls)
        self.seed, self.shuffle_buffer = seed, max(1, int(shuffle_buffer))
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.weights = [float((weights or {}).get(u, 1.0)) for u in self.urls]
        if resampled and not samples_per_epoch:
            raise ValueError("resampled epochs need samples_per_epoch")
        self.resume_positions: Optional[list] = None  # per DataLoader worker, set by the Batcher
        self.skips: Counter = Counter()  # raw-read skips not yet handed to a batch
        self._position: Optional[dict] = None
        self._buffer: list = []

    # -- what a subclass provides ------------------------------------------------------------
    def index_size(self, url: str) -> Optional[int]:
        """Items in the shard's index, or None when it has none."""
        return None

    def read(self, part: Part, epoch: int, start: int, skips: Counter) -> Iterator[tuple[int, object]]:
        """(item number, raw item) of `part` from item `start` on, in order."""
        raise NotImplementedError

    def fetch(self, part: Part, epoch: int, wanted: set, skips: Counter) -> dict:
        """{item number: raw item} of the `wanted` items of a part (a resumed buffer)."""
        found = {}
        for number, raw in self.read(part, epoch, min(wanted), skips):
            if number in wanted:
                found[number] = raw
                if len(found) == len(wanted):
                    break
        return found

    def decode(self, raw, rng: random.Random) -> dict:
        """A training item, or {"skip": reason}."""
        return raw

    def empty_error(self, reader: int, readers: int, skipped: Counter) -> Exception:
        return ProalignError(f"no usable item in {MAX_EMPTY_EPOCHS} epochs over {len(self.urls)} shard(s) for "
                             f"reader {reader} of {readers}; skipped: {dict(skipped) or 'nothing was read'}")

    # -- the reading ------------------------------------------------------------------------
    def layout(self) -> tuple[int, int, int]:
        """(this process's DataLoader worker, reader index, reader count)."""
        rank, world = rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker, rank * workers + worker, world * workers

    def position(self) -> Optional[dict]:
        """Where this reader stands after the items it has given out (a JSON value)."""
        if self._position is None:
            return None
        return {**self._position, "buffer": [[p, n] for p, n, _ in self._buffer]}

    def take_skips(self) -> dict:
        taken, self.skips = dict(self.skips), Counter()
        return taken

    def _start(self) -> dict:
        worker, reader, readers = self.layout()
        fresh = {"slot": worker, "reader": reader, "readers": readers, "epoch": 0, "part": 0, "item": 0,
                 "given": 0, "buffer": []}
        if not self.resume_positions:
            return fresh
        saved = self.resume_positions[worker]
        if int(saved.get("readers", readers)) != readers:
            raise ReaderLayoutError(f"a saved reader position belongs to {saved.get('readers')} readers; this run "
                                    f"has {readers}")
        return {**fresh, **saved, "slot": worker}

    def _parts(self, pos: dict) -> Sequence[Part]:
        if self.resampled:
            return _ResampledParts(self, pos["epoch"], pos["reader"])
        return plan_epoch(self.urls, self.seed, pos["epoch"], pos["reader"], pos["readers"], self.index_size)

    def _quota(self, pos: dict) -> Optional[int]:
        """Items this reader reads in a resampled epoch (its share of samples_per_epoch)."""
        if not self.resampled:
            return None
        share, extra = divmod(int(self.samples_per_epoch), pos["readers"])
        return share + (pos["reader"] < extra)

    def _refill(self, pos: dict, parts: Sequence[Part]) -> list:
        """The buffer of a resumed position, its items read again (their skips are not counted twice)."""
        wanted: dict[int, set] = {}
        for part_no, number in pos.get("buffer", []):
            wanted.setdefault(int(part_no), set()).add(int(number))
        found = {}
        for part_no, numbers in wanted.items():
            got = self.fetch(parts[part_no], pos["epoch"], numbers, Counter())
            found.update({(part_no, n): raw for n, raw in got.items()})
        missing = [key for key in ((int(p), int(n)) for p, n in pos.get("buffer", [])) if key not in found]
        if missing:
            raise ProalignError(f"resume: {len(missing)} buffered item(s) of the saved position could not be read "
                                f"again (part {missing[0][0]}, item {missing[0][1]} of epoch {pos['epoch']}); were "
                                "the shards or their cache changed since the checkpoint?")
        return [(int(p), int(n), found[(int(p), int(n))]) for p, n in pos.get("buffer", [])]

    def __iter__(self):
        pos = self._start()
        empty_epochs, resumed = 0, bool(self.resume_positions)
        while True:
            usable, skipped, given = 0, Counter(), pos["given"]
            for item in self._epoch(pos):
                if "skip" in item:
                    skipped[item["skip"]] += 1
                else:
                    usable += 1
                yield item
            # an epoch resumed at its very end gives nothing more, and is not an empty one
            if not (resumed and pos["given"] == given):
                empty_epochs = 0 if usable else empty_epochs + 1
            resumed = False
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise self.empty_error(pos["reader"], pos["readers"], skipped + self.skips)
            pos = {**pos, "epoch": pos["epoch"] + 1, "part": 0, "item": 0, "given": 0, "buffer": []}

    def _epoch(self, pos: dict) -> Iterator[dict]:
        self._position = pos
        parts = self._parts(pos)
        self._buffer = buffer = self._refill(pos, parts) if pos.get("buffer") else []
        quota = self._quota(pos)

        def give() -> dict:
            rng = _seed(self.seed, pos["epoch"], pos["reader"], "pop", pos["given"])
            part_no, number, raw = buffer.pop(rng.randrange(len(buffer)))
            pos["given"] += 1
            return self.decode(raw, _seed(self.seed, pos["epoch"], pos["reader"], part_no, number))

        empty_parts = 0  # a resampled epoch over shards that give nothing ends instead of drawing forever
        while (quota is None and pos["part"] < len(parts)) or (quota is not None and empty_parts < 2 * len(self.urls)
                                                               + 8 and pos["given"] + len(buffer) < quota):
            part_no = pos["part"]
            empty_parts += 1
            for number, raw in self.read(parts[part_no], pos["epoch"], pos["item"], self.skips):
                empty_parts = 0
                buffer.append((part_no, number, raw))
                pos["item"] = number + 1
                if len(buffer) >= self.shuffle_buffer:
                    yield give()
                if quota is not None and pos["given"] + len(buffer) >= quota:
                    break
            else:
                pos["part"], pos["item"] = part_no + 1, 0
        while buffer:
            yield give()


class _ResampledParts(Sequence):
    """The endless parts of a resampled epoch: part n is a whole shard drawn with replacement,
    weighted, from a seed of (seed, epoch, reader, n)."""

    def __init__(self, stream: PartStream, epoch: int, reader: int):
        self.stream, self.epoch, self.reader = stream, epoch, reader

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, number: int) -> Part:
        s = self.stream
        url = _seed(s.seed, self.epoch, self.reader, "shard", number).choices(s.urls, weights=s.weights)[0]
        return Part(url)


def collate(items: list[dict]) -> dict:
    """Tensors stacked, everything else listed, field by field."""
    import torch
    return {key: torch.stack([i[key] for i in items]) if isinstance(items[0][key], torch.Tensor)
            else [i[key] for i in items] for key in items[0]}


class _BatchedStream(IterableDataset):
    """Collates inside each worker (one IPC transfer per batch, not per sample); every batch
    carries the skip counts met while filling it and, for a resumable stream, the reader's
    position after it. Items are dicts, or `{"skip": reason}`."""

    def __init__(self, stream: IterableDataset, batch_size: int):
        super().__init__()
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self):
        resumable = isinstance(self.stream, PartStream)
        items, skips = [], Counter()
        for item in self.stream:
            if "skip" in item:
                skips[item["skip"]] += 1
                continue
            items.append(item)
            if len(items) == self.batch_size:
                batch = {**collate(items), "skips": dict(skips)}
                if resumable:
                    batch["skips"] = dict(skips + Counter(self.stream.take_skips()))
                    batch["reader_position"] = self.stream.position()
                yield batch
                items, skips = [], Counter()


class Batcher:
    """Batches from the stream (collated in the DataLoader workers), counting skips, with a
    resumable position (`position()`).

    A `PartStream` resumes from the saved positions of its readers: DataLoader workers hand out
    batches round-robin, so the position also names the worker whose batch comes next, and on
    resume worker i takes the place of saved reader (next + i) mod K. Any other stream (or a
    checkpoint holding only a sample count) is replayed: its first `samples_consumed` samples
    are read again and dropped."""

    def __init__(self, stream: IterableDataset, batch_size: int, num_workers: int = 0, position=None):
        from torch.utils.data import DataLoader
        self.batch_size, self.workers = batch_size, max(1, num_workers)
        self.skips: Counter = Counter()
        self.readers: list = [None] * self.workers
        self.next_slot = 0
        position = {"samples_consumed": position} if isinstance(position, int) else dict(position or {})
        self.consumed = 0  # samples handed out so far
        replay = int(position.get("samples_consumed", 0))
        saved = position.get("readers")
        if saved and isinstance(stream, PartStream):
            if len(saved) != self.workers:
                raise ReaderLayoutError(f"the saved data position has {len(saved)} reader(s) per rank; this run has "
                                        f"{self.workers} (data.num_workers)")
            start = int(position.get("next_slot", 0))
            stream.resume_positions = [saved[(start + i) % self.workers] for i in range(self.workers)]
            self.consumed, replay = replay, 0
        elif replay:
            log.warning("resuming a stream without saved reader positions: re-reading its first %d samples", replay)
        loader = DataLoader(_BatchedStream(stream, batch_size), batch_size=None, num_workers=num_workers,
                            persistent_workers=num_workers > 0)
        self.iterator = iter(loader)
        self._fresh = self._fresh_positions(stream)
        if replay % batch_size:
            log.warning("resume position %d is not a multiple of the batch size %d; rounding down", replay, batch_size)
        for _ in range(replay // batch_size):
            self.next_batch()

    def _fresh_positions(self, stream) -> list:
        """Each worker slot's position before its first batch: its reader, at the start (or the
        saved position it resumed from)."""
        if not isinstance(stream, PartStream):
            return [None] * self.workers
        if stream.resume_positions:
            return list(stream.resume_positions)
        rank, world = rank_and_world()
        return [{"reader": rank * self.workers + k, "readers": world * self.workers} for k in range(self.workers)]

    def next_batch(self) -> dict:
        batch = next(self.iterator)
        for reason, count in batch.pop("skips").items():
            self.skips[reason] += count
        reader = batch.pop("reader_position", None)
        if reader is not None:
            slot = int(reader["slot"])
            self.readers[slot] = reader
            self.next_slot = (slot + 1) % self.workers
        self.consumed += self.batch_size
        return batch

    def position(self) -> dict:
        """The data position as a JSON value: samples consumed, each worker slot's reader position
        and the slot whose batch comes next."""
        state: dict = {"samples_consumed": self.consumed}
        if any(r is not None for r in self._fresh):
            state["readers"] = [r if r is not None else self._fresh[k] for k, r in enumerate(self.readers)]
            state["next_slot"] = self.next_slot
        return state
