"""Image classification sets in the layouts users have on disk, for zero-shot evaluation and CoOp.

- `imagefolder`: torchvision's layout, `<root>/<class>/<image>`; the class id is the folder name
  and its default English name the folder name with `_` as spaces.
- `coop-split`: CoOp's split file (`split_zhou_<Dataset>.json`: `{"train"|"val"|"test": [[image
  path, label, class name], ...]}`) over an image root; the class id is the label, its default
  English name the split's class name.

Class names in other languages (or better English ones) come from `classnames`: a folder of
`<lang>.txt` / `<lang>.json` files, or one such file (its stem is the language). A `.txt` holds
one class per line, `<class id> <name>` (ImageNet's `n01440764 tench` style) or the names alone
in class order; a `.json` maps class id -> name (or name list), or lists the names in class order.
"""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .readers import DatasetFormatError, image_inside, register_format

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class ClassificationRecords:
    """Image files with class indices, the class ids and each class's names per language."""
    items: list[tuple[Path, int]]
    classes: list[str]
    names: list[dict[str, list[str]]]
    source: str = ""

    def subset(self, items: Sequence[tuple[Path, int]]) -> "ClassificationRecords":
        return ClassificationRecords(list(items), self.classes, self.names, self.source)


@dataclass
class ImageFolderOptions:
    classnames: Optional[str] = None  # folder of <lang>.txt/.json, or one such file
    language: str = "en"              # language of the folder names


@dataclass
class CoopSplitOptions:
    split: str = "test"               # train | val | test
    split_file: Optional[str] = None  # default: the one split_zhou_*.json in the root
    images: Optional[str] = None      # image root, relative to the root (default: the root)
    classnames: Optional[str] = None
    language: str = "en"              # language of the split's class names


def _readable_name(class_id: str) -> str:
    return class_id.replace("_", " ").strip()


@register_format("imagefolder", ImageFolderOptions, task="classification")
def read_imagefolder(root: str | Path, classnames: Optional[str] = None, language: str = "en") -> ClassificationRecords:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder root not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetFormatError(f"{root}: no class folders (expected <root>/<class>/<image>)")
    items = []
    for index, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            log.warning("imagefolder %s: class folder %r holds no images", root, cls)
        items += [(p, index) for p in files]
    names = [{language: [_readable_name(c)]} for c in classes]
    records = ClassificationRecords(items, classes, names, str(root))
    return _with_classnames(records, classnames, root)


def _find_split_file(root: Path, split_file: Optional[str]) -> Path:
    if split_file:
        path = root / split_file
        if not path.is_file():
            raise FileNotFoundError(f"coop-split: split file not found: {path}")
        return path
    found = sorted(root.glob("split_zhou_*.json"))
    if len(found) != 1:
        raise DatasetFormatError(f"{root}: expected one split_zhou_*.json, found {len(found)}; set options.split_file")
    return found[0]


@register_format("coop-split", CoopSplitOptions, task="classification")
def read_coop_split(root: str | Path, split: str = "test", split_file: Optional[str] = None,
                    images: Optional[str] = None, classnames: Optional[str] = None,
                    language: str = "en") -> ClassificationRecords:
    root = Path(root)
    path = _find_split_file(root, split_file)
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(splits, dict) or split not in splits:
        have = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise DatasetFormatError(f"{path}: no {split!r} split (has {have})")
    image_root = root / images if images else root
    by_label: dict[int, str] = {}
    # every split's labels: the class list is the same whichever split is read
    for name, entries in splits.items():
        if not isinstance(entries, list):
            raise DatasetFormatError(f"{path}: split {name!r} should be a list")
        for i, entry in enumerate(entries):
            where = f"{path}: {name}[{i}]"
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and not isinstance(entry[1], bool) and isinstance(entry[2], str)):
                raise DatasetFormatError(f"{where}: expected [image path, integer label, class name], got {entry!r}")
            known = by_label.setdefault(entry[1], entry[2])
            if known != entry[2]:
                raise DatasetFormatError(f"{where}: label {entry[1]} is named {entry[2]!r} here and {known!r} before")
    labels = sorted(by_label)
    index_of = {label: i for i, label in enumerate(labels)}
    items = []
    for i, (image, label, _) in enumerate(splits[split]):
        items.append((image_inside(image_root, image, f"{path}: {split}[{i}]"), index_of[label]))
    classes = [str(label) for label in labels]
    names = [{language: [_readable_name(by_label[label])]} for label in labels]
    return _with_classnames(ClassificationRecords(items, classes, names, f"{path}:{split}"), classnames, root)


def _classname_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".json"))
        if not files:
            raise DatasetFormatError(f"{path}: no <lang>.txt or <lang>.json class-name files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"class-name file or folder not found: {path}")
    return [path]


def read_classnames(path: Path, classes: Sequence[str]) -> dict[str, dict[int, list[str]]]:
    """language -> class index -> names, from a class-name file or folder (see the module doc)."""
    index_of = {c: i for i, c in enumerate(classes)}
    out: dict[str, dict[int, list[str]]] = {}
    for file in _classname_files(path):
        found: dict[int, list[str]] = {}
        if file.suffix == ".json":
            try:
                value = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DatasetFormatError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
            pairs = list(value.items()) if isinstance(value, dict) else list(zip(classes, value)) \
                if isinstance(value, list) else None
            if pairs is None:
                raise DatasetFormatError(f"{file}: expected an object (class id -> name) or a list of names")
            if isinstance(value, list) and len(value) != len(classes):
                raise DatasetFormatError(f"{file}: {len(value)} names for {len(classes)} classes")
            for cls, names in pairs:
                if str(cls) not in index_of:
                    raise DatasetFormatError(f"{file}: unknown class id {cls!r}")
                names = [names] if isinstance(names, str) else names
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise DatasetFormatError(f"{file}: class {cls!r}: names should be a string or a list of strings")
                found[index_of[str(cls)]] = [n.strip() for n in names if n.strip()]
        else:
            lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
            keyed = all(line.split(maxsplit=1)[0] in index_of and len(line.split(maxsplit=1)) == 2 for line in lines)
            if keyed:
                for line in lines:
                    cls, name = line.split(maxsplit=1)
                    found[index_of[cls]] = [name.strip()]
            elif len(lines) == len(classes):
                found = {i: [name] for i, name in enumerate(lines)}
            else:
                raise DatasetFormatError(f"{file}: {len(lines)} lines for {len(classes)} classes, and not every line "
                                         "starts with a known class id")
        out[file.stem] = found
    return out


def _with_classnames(records: ClassificationRecords, classnames: Optional[str], root: Path) -> ClassificationRecords:
    if not classnames:
        return records
    path = Path(classnames)
    path = path if path.is_absolute() or path.exists() else root / path
    for lang, by_class in read_classnames(path, records.classes).items():
        missing = len(records.classes) - len(by_class)
        if missing:
            log.warning("class names %s: %d of %d classes have no %s name (left out in %s)", path, missing,
                        len(records.classes), lang, lang)
        for index, names in by_class.items():
            if names:
                records.names[index][lang] = names
    return records


def few_shot(records: ClassificationRecords, shots: int, seed: int) -> ClassificationRecords:
    """`shots` images per class (all of a smaller class), drawn with `seed`: the same subset for
    one seed, different subsets across seeds (CoOp's protocol)."""
    rng = random.Random(seed)
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for item in records.items:
        by_class.setdefault(item[1], []).append(item)
    picked = []
    for label in sorted(by_class):
        items = by_class[label]
        picked += rng.sample(items, min(shots, len(items)))
    return records.subset(picked)


def decode_classification(records: ClassificationRecords, preprocess: Callable, max_samples: Optional[int] = None,
                          skips: Optional[Counter] = None):
    """LabelledImages of the records (unreadable images skipped, counted and logged)."""
    import torch
    from PIL import Image
    from .classes import LabelledImages
    skips = skips if skips is not None else Counter()
    images, labels = [], []
    for path, label in records.items[:max_samples] if max_samples else records.items:
        try:
            with Image.open(path) as image:
                images.append(preprocess(image.convert("RGB")))
        except Exception as err:  # counted skip: corrupt image file
            skips["bad_image"] += 1
            log.warning("skipping unreadable image %s: %s", path, err)
            continue
        labels.append(label)
    if not images:
        raise DatasetFormatError(f"{records.source}: no readable images")
    return LabelledImages(torch.stack(images), torch.tensor(labels), list(records.classes),
                          [dict(n) for n in records.names], skips)


def class_halves(n_classes: int) -> tuple[list[int], list[int]]:
    """CoOp's base-to-new split: the first ceil(n/2) classes (sorted ids) are base, the rest new."""
    m = (n_classes + 1) // 2
    return list(range(m)), list(range(m, n_classes))
