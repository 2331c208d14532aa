"""Loading any registered dataset format: records (`read_dataset`), decoded retrieval sets
(`load_dataset`) and labelled classification sets (`load_classification`). Importing this module
registers the built-in formats (readers.py, classification.py)."""
from __future__ import annotations

import inspect
import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

from .images import open_rgb

from . import readers  # noqa: F401  (registers the retrieval formats)
from .classification import decode_classification, few_shot, pick_classes
from .formats import FORMATS, DatasetFormatError, Record

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "load_classification", "load_dataset", "load_records", "read_dataset"]


def _values(options) -> dict:
    """A format's options as keyword arguments: its options dataclass (validated from a config), a
    mapping (from code), or nothing."""
    if options is None:
        return {}
    return dict(options) if isinstance(options, dict) else dict(vars(options))


def read_dataset(fmt: str, path: str | Path, languages: Optional[Sequence[str]] = None, **options) -> list[Record]:
    """The records of a registered (record-based) format; `options` are its dataclass's fields."""
    entry = FORMATS.get(fmt, "format")
    kwargs = dict(vars(entry.options(**options)))
    if "languages" in inspect.signature(entry.read).parameters:
        kwargs["languages"] = languages
    return entry.read(path, **kwargs)


def load_dataset(fmt: str, path, preprocess: Callable, options=None, languages: Optional[Sequence[str]] = None,
                 max_samples: Optional[int] = None, skips: Optional[Counter] = None):
    """(images tensor, keys, {key: meta}) of any registered retrieval format."""
    entry = FORMATS.get(fmt, "format")
    if entry.task != "retrieval":
        raise ValueError(f"dataset format {fmt!r} is a {entry.task} format (use load_classification)")
    if entry.decoded:
        return entry.read(path, preprocess, max_samples=max_samples, skips=skips,
                          **_values(options))
    records = read_dataset(fmt, path, languages, **_values(options))
    return load_records(records, preprocess, max_samples, skips)


def load_records(records: Sequence[Record], preprocess: Callable, max_samples: Optional[int] = None,
                 skips: Optional[Counter] = None):
    """(images tensor, keys, {key: {"captions": ...}}) like `shards.load_image_text`; unreadable
    images are skipped, counted and logged with their path."""
    import torch
    skips = skips if skips is not None else Counter()
    images, keys, metas = [], [], {}
    for record in records[:max_samples] if max_samples else records:
        if record.key in metas:
            raise DatasetFormatError(f"duplicate image key {record.key!r} ({record.image_path})")
        try:
            images.append(preprocess(open_rgb(record.image_path)))
        except Exception as err:  # counted skip: corrupt image file
            skips["bad_image"] += 1
            log.warning("skipping unreadable image %s: %s", record.image_path, err)
            continue
        keys.append(record.key)
        metas[record.key] = {"captions": record.captions}
    return (torch.stack(images) if images else torch.empty(0)), keys, metas


def load_classification(fmt: str, path, preprocess: Callable, options=None, max_samples: Optional[int] = None,
                        skips: Optional[Counter] = None, shots: Optional[int] = None, seed: int = 0,
                        max_classes: Optional[int] = None, only_classes: Optional[set] = None):
    """LabelledImages of a registered classification format (`shots` per class drawn with `seed`;
    `max_classes` / `only_classes` as in `classification.pick_classes`, applied before decoding)."""
    entry = FORMATS.get(fmt, "format")
    if entry.task != "classification":
        raise ValueError(f"dataset format {fmt!r} is not a classification format")
    records = entry.read(path, **_values(options))
    picked = pick_classes(records.classes, max_classes, only_classes)
    if not picked:
        raise DatasetFormatError(f"{records.source}: none of the wanted classes")
    if picked != records.classes:
        wanted = set(picked)
        records = records.subset([item for item in records.items if records.classes[item[1]] in wanted])
    if shots:
        records = few_shot(records, shots, seed)
    data = decode_classification(records, preprocess, max_samples, skips)
    return data if picked == records.classes else data.only(picked)
