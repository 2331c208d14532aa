"""Readers for the real evaluation sets, in their published on-disk formats.

Each returns a list of `Record(key, image_path, captions)` with `captions` mapping language ->
list of captions. Errors name the file (and line) at fault:

- `xm3600`:     <root>/captions.jsonl (one record per image: `image/key`, `image/locale`,
                `<lang>: {caption: [...], caption/tokenized: [...], ...}`)
                + <root>/images/<key>.jpg
- `urban1k`:    <root>/caption/<n>.txt + <root>/image/<n>.jpg
- `sharegpt4v`: a json list of `{"image": path, "conversations": [..., {"from": "gpt", "value": caption}]}`,
                images relative to `images` (default: the json's folder); the first 1k form ShareGPT4V-1k
- `docci`:      <root>/docci_descriptions.jsonlines (`example_id`, `split`, `image_file`, `description`)
                + <root>/images/; only `split` (default `test`) is read
- `dci`:        <root>/annotations/*.json (`image`, `short_caption`, `extra_caption`) + <root>/photos/;
                caption = short + extra caption (the full human description)
- `jsonl`:      one json per line: `{"image": path, "captions": {"en": [...]}}` (or `"caption": str`
                with `language`), images relative to the file's folder
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .captions import CaptionField
from .formats import DatasetFormatError, Record, image_inside, json_lines, need_file, record_field, register_format

log = logging.getLogger(__name__)


@dataclass
class ShareGPT4VOptions:
    images: Optional[str] = None   # image root (default: the json's folder)
    limit: Optional[int] = 1000    # the first N records (ShareGPT4V-1k); null: all


@dataclass
class DocciOptions:
    split: str = "test"            # the `split` value of the records to read


@register_format("xm3600")
def read_xm3600(root: str | Path, languages: Optional[Sequence[str]] = None) -> list[Record]:
    root = Path(root)
    path = need_file(root / "captions.jsonl", "XM3600 captions file")
    records = []
    for number, row in json_lines(path):
        where = f"{path}:{number}"
        key = record_field(row, "image/key", where)
        captions = {}
        for lang, block in row.items():
            # `image/key`, `image/locale`, ...: per-image metadata, not languages
            if lang.startswith("image/") or (languages and lang not in languages):
                continue
            if not isinstance(block, dict) or not isinstance(block.get("caption"), list):
                raise DatasetFormatError(f"{where}: language {lang!r} should hold {{'caption': [...]}}")
            captions[lang] = [c for c in block["caption"] if isinstance(c, str) and c.strip()]
        records.append(Record(key, image_inside(root / "images", f"{key}.jpg", where), captions))
    return records


@register_format("urban1k")
def read_urban1k(root: str | Path) -> list[Record]:
    root = Path(root)
    caption_dir = need_file(root / "caption", "Urban-1k caption folder")
    image_dir = need_file(root / "image", "Urban-1k image folder")
    records = []
    for path in sorted(caption_dir.glob("*.txt"), key=lambda p: (len(p.stem), p.stem)):
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise DatasetFormatError(f"{path}: empty caption")
        records.append(Record(path.stem, image_inside(image_dir, f"{path.stem}.jpg", str(path)), {"en": [text]}))
    if not records:
        raise DatasetFormatError(f"{caption_dir}: no caption/*.txt files")
    return records


@register_format("sharegpt4v", ShareGPT4VOptions)
def read_sharegpt4v(path: str | Path, images: Optional[str | Path] = None, limit: Optional[int] = 1000) -> list[Record]:
    path = need_file(Path(path), "ShareGPT4V json")
    image_root = Path(images) if images else path.parent
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(rows, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of records")
    records = []
    for index, row in enumerate(rows[:limit] if limit else rows):
        where = f"{path}: record {index}"
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{where}: expected an object")
        turns = record_field(row, "conversations", where, list)
        answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        if not answers or not isinstance(answers[0], str) or not answers[0].strip():
            raise DatasetFormatError(f"{where}: no 'gpt' turn with a caption")
        image = record_field(row, "image", where)
        records.append(Record(str(row.get("id", index)), image_inside(image_root, image, where), {"en": [answers[0].strip()]}))
    return records


@register_format("docci", DocciOptions)
def read_docci(root: str | Path, split: str = "test") -> list[Record]:
    root = Path(root)
    path = need_file(root / "docci_descriptions.jsonlines", "DOCCI descriptions file")
    records = []
    for number, row in json_lines(path):
        where = f"{path}:{number}"
        if record_field(row, "split", where) != split:
            continue
        key = record_field(row, "example_id", where)
        text = record_field(row, "description", where)
        records.append(Record(key, image_inside(root / "images", record_field(row, "image_file", where), where), {"en": [text]}))
    if not records:
        raise DatasetFormatError(f"{path}: no records with split {split!r}")
    return records


@register_format("dci")
def read_dci(root: str | Path) -> list[Record]:
    root = Path(root)
    folder = need_file(root / "annotations", "DCI annotations folder")
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        where = str(path)
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object")
        short = record_field(row, "short_caption", where).strip()
        extra = str(row.get("extra_caption") or "").strip()
        text = f"{short} {extra}".strip()
        if not text:
            raise DatasetFormatError(f"{where}: empty short_caption and extra_caption")
        records.append(Record(path.stem, image_inside(root / "photos", record_field(row, "image", where), where), {"en": [text]}))
    if not records:
        raise DatasetFormatError(f"{folder}: no annotation files")
    return records


@register_format("jsonl")
def read_jsonl(path: str | Path) -> list[Record]:
    path = need_file(Path(path), "jsonl dataset")
    records = []
    for number, row in json_lines(path):
        where = f"{path}:{number}"
        image = record_field(row, "image", where)
        if "captions" in row:
            caps = record_field(row, "captions", where, dict)
            captions = {lang: [v] if isinstance(v, str) else list(v) for lang, v in caps.items()}
        else:
            captions = {str(row.get("language", "en")): [record_field(row, "caption", where)]}
        key = str(row.get("key", row.get("id", number)))
        records.append(Record(key, image_inside(path.parent, image, where), captions))
    return records


@dataclass
class ShardOptions:
    # where a sample's captions come from, as `data.captions` (empty: auto)
    captions: list[CaptionField] = field(default_factory=list)


@register_format("shards", ShardOptions, decoded=True)
def read_shards(path, preprocess: Callable, max_samples: Optional[int] = None, skips: Optional[Counter] = None,
                captions: Sequence = ()):
    """webdataset shards (a brace pattern, glob or list): decoded by the shard reader."""
    from .captions import CaptionSpec
    from .shards import expand_shards, load_image_text
    return load_image_text(expand_shards(path), preprocess, max_samples=max_samples, skips=skips,
                           captions=CaptionSpec(captions))
