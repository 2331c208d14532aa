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
from dataclasses import dataclass
from pathlib import Path
import inspect
from typing import Callable, Iterator, Optional, Sequence

from PIL import Image

from ..errors import ProalignError

log = logging.getLogger(__name__)


class DatasetFormatError(ProalignError, ValueError):
    """A dataset file or record does not have the expected shape; the message names file and line."""


@dataclass
class Record:
    key: str
    image_path: Path
    captions: dict[str, list[str]]


def _need_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(value, dict):
                raise DatasetFormatError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
            yield number, value


def _field(record: dict, name: str, where: str, kind=str):
    if name not in record:
        raise DatasetFormatError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind):
        raise DatasetFormatError(f"{where}: field {name!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def image_inside(root: Path, name: str, where: str) -> Path:
    """`root / name` for an image name read from a dataset file. The name must stay inside the root
    (no `..`, not absolute, not empty): a dataset file never opens an arbitrary file on the machine,
    as tar members named so are skipped in shards. A missing image names the file and line."""
    from pathlib import PurePosixPath, PureWindowsPath
    if not name or ".." in PurePosixPath(name).parts or PurePosixPath(name).is_absolute() \
            or PureWindowsPath(name).drive or ".." in PureWindowsPath(name).parts:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise DatasetFormatError(f"{where}: image name {shown!r} must be a relative path inside {root}")
    path = root / name
    if not path.is_file():
        raise DatasetFormatError(f"{where}: image {path} not found")
    return path



# --------------------------------------------------------------------------- the format registry
# A format is one reader plus one options dataclass, registered here; `eval.datasets[i].options`
# is validated against the dataclass (errors name the field). A reader returns Records
# (images are decoded by `load_records`), or, with `decoded=True`, (images, keys, metas) itself.


@dataclass
class NoOptions:
    """The format takes no options."""


@dataclass
class EvalFormat:
    read: Callable
    options: type
    decoded: bool = False
    task: str = "retrieval"  # or "classification": the reader returns ClassificationRecords


FORMATS: dict[str, EvalFormat] = {}


def register_format(name: str, options: type = NoOptions, decoded: bool = False, task: str = "retrieval"):
    if task not in ("retrieval", "classification"):
        raise ValueError(f"dataset format {name!r}: task must be retrieval or classification, got {task!r}")

    def add(reader):
        if name in FORMATS:
            raise ValueError(f"dataset format {name!r} is already registered")
        FORMATS[name] = EvalFormat(reader, options, decoded, task)
        return reader
    return add


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
    path = _need_file(root / "captions.jsonl", "XM3600 captions file")
    records = []
    for number, row in _json_lines(path):
        where = f"{path}:{number}"
        key = _field(row, "image/key", where)
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
    caption_dir = _need_file(root / "caption", "Urban-1k caption folder")
    image_dir = _need_file(root / "image", "Urban-1k image folder")
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
    path = _need_file(Path(path), "ShareGPT4V json")
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
        turns = _field(row, "conversations", where, list)
        answers = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        if not answers or not isinstance(answers[0], str) or not answers[0].strip():
            raise DatasetFormatError(f"{where}: no 'gpt' turn with a caption")
        image = _field(row, "image", where)
        records.append(Record(str(row.get("id", index)), image_inside(image_root, image, where), {"en": [answers[0].strip()]}))
    return records


@register_format("docci", DocciOptions)
def read_docci(root: str | Path, split: str = "test") -> list[Record]:
    root = Path(root)
    path = _need_file(root / "docci_descriptions.jsonlines", "DOCCI descriptions file")
    records = []
    for number, row in _json_lines(path):
        where = f"{path}:{number}"
        if _field(row, "split", where) != split:
            continue
        key = _field(row, "example_id", where)
        text = _field(row, "description", where)
        records.append(Record(key, image_inside(root / "images", _field(row, "image_file", where), where), {"en": [text]}))
    if not records:
        raise DatasetFormatError(f"{path}: no records with split {split!r}")
    return records


@register_format("dci")
def read_dci(root: str | Path) -> list[Record]:
    root = Path(root)
    folder = _need_file(root / "annotations", "DCI annotations folder")
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        where = str(path)
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object")
        short = _field(row, "short_caption", where).strip()
        extra = str(row.get("extra_caption") or "").strip()
        text = f"{short} {extra}".strip()
        if not text:
            raise DatasetFormatError(f"{where}: empty short_caption and extra_caption")
        records.append(Record(path.stem, image_inside(root / "photos", _field(row, "image", where), where), {"en": [text]}))
    if not records:
        raise DatasetFormatError(f"{folder}: no annotation files")
    return records


@register_format("jsonl")
def read_jsonl(path: str | Path) -> list[Record]:
    path = _need_file(Path(path), "jsonl dataset")
    records = []
    for number, row in _json_lines(path):
        where = f"{path}:{number}"
        image = _field(row, "image", where)
        if "captions" in row:
            caps = _field(row, "captions", where, dict)
            captions = {lang: [v] if isinstance(v, str) else list(v) for lang, v in caps.items()}
        else:
            captions = {str(row.get("language", "en")): [_field(row, "caption", where)]}
        key = str(row.get("key", row.get("id", number)))
        records.append(Record(key, image_inside(path.parent, image, where), captions))
    return records


@register_format("shards", decoded=True)
def read_shards(path, preprocess: Callable, max_samples: Optional[int] = None, skips: Optional[Counter] = None):
    """webdataset shards (a brace pattern, glob or list): decoded by the shard reader."""
    from .shards import expand_shards, load_image_text
    return load_image_text(expand_shards(path), preprocess, max_samples=max_samples, skips=skips)


def read_dataset(fmt: str, path: str | Path, languages: Optional[Sequence[str]] = None, **options) -> list[Record]:
    """The records of a registered (record-based) format; `options` are its dataclass's fields."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    entry = FORMATS[fmt]
    kwargs = dict(vars(entry.options(**options)))
    if "languages" in inspect.signature(entry.read).parameters:
        kwargs["languages"] = languages
    return entry.read(path, **kwargs)


def load_dataset(fmt: str, path, preprocess: Callable, options=None, languages: Optional[Sequence[str]] = None,
                 max_samples: Optional[int] = None, skips: Optional[Counter] = None):
    """(images tensor, keys, {key: meta}) of any registered retrieval format."""
    entry = FORMATS[fmt]
    if entry.task != "retrieval":
        raise ValueError(f"dataset format {fmt!r} is a {entry.task} format (use load_classification)")
    if entry.decoded:
        return entry.read(path, preprocess, max_samples=max_samples, skips=skips)
    records = read_dataset(fmt, path, languages, **(vars(options) if options is not None else {}))
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
            with Image.open(record.image_path) as image:
                images.append(preprocess(image.convert("RGB")))
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
    `max_classes` / `only_classes` as in `classes.pick_classes`, applied before decoding)."""
    from .classes import pick_classes
    from .classification import decode_classification, few_shot
    entry = FORMATS[fmt]
    if entry.task != "classification":
        raise ValueError(f"dataset format {fmt!r} is not a classification format")
    records = entry.read(path, **(vars(options) if options is not None else {}))
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


from . import classification  # noqa: E402,F401  (registers imagefolder and coop-split)
