"""Image classification sets, for zero-shot evaluation and CoOp: `LabelledImages`, read from
labelled image-text shards (`read_labelled`) or from the layouts users have on disk.

Shards: a sample's class is its json `label` (else its key). Class names per language come from
`class_names` (`{"en": ["cat"], "de": ["Katze"]}`) when present, else from its captions, so a
class may have names in several languages. K shots per class are drawn with a fixed seed.

Formats on disk:

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
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .formats import DatasetFormatError, image_inside, register_format
from .images import open_rgb
from .shards import IMAGE_EXTS, decode_image, expand_shards, iter_raw_samples, parse_meta

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {f".{ext}" for ext in IMAGE_EXTS}


@dataclass
class LabelledImages:
    images: torch.Tensor               # (N, 3, H, W) preprocessed
    labels: torch.Tensor               # (N,) index into `classes`
    classes: list[str]                 # class ids
    names: list[dict[str, list[str]]]  # per class: language -> names
    skips: Counter = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)  # per image, where it came from (shard#key); may be empty

    def name_in(self, cls: int, language: str) -> Optional[str]:
        found = self.names[cls].get(language)
        return found[0] if found else None

    def languages(self) -> list[str]:
        return sorted({lang for names in self.names for lang in names})

    def only(self, class_ids) -> "LabelledImages":
        """The images of the given classes (by id), labels renumbered in this set's class order."""
        wanted = set(class_ids)
        kept = [i for i, c in enumerate(self.classes) if c in wanted]
        remap = torch.full((len(self.classes),), -1, dtype=torch.long)
        remap[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        rows = remap[self.labels] >= 0
        keys = [k for k, keep in zip(self.keys, rows.tolist()) if keep]
        return LabelledImages(self.images[rows], remap[self.labels][rows], [self.classes[i] for i in kept],
                              [self.names[i] for i in kept], self.skips, keys)


def _class_names(meta: dict) -> dict[str, list[str]]:
    source = meta.get("class_names") or meta.get("captions") or {}
    out = {}
    for lang, names in source.items():
        names = [names] if isinstance(names, str) else names
        kept = [n.strip() for n in names if isinstance(n, str) and n.strip()]
        if kept:
            out[lang] = kept
    return out


def pick_classes(classes: list, max_classes: Optional[int] = None, only_classes: Optional[set] = None) -> list:
    """`classes` limited to `only_classes`, then to a random `max_classes` of them (drawn with seed
    0, so every few-shot seed sees the same classes), in their original order."""
    if only_classes is not None:
        classes = [c for c in classes if c in only_classes]
    if max_classes and len(classes) > max_classes:
        picked = set(random.Random(0).sample(classes, max_classes))
        classes = [c for c in classes if c in picked]
    return classes


def read_labelled(shards, preprocess: Callable, shots: Optional[int] = None, seed: int = 0,
                  max_samples: Optional[int] = None, max_classes: Optional[int] = None,
                  only_classes: Optional[set] = None, rest: bool = False) -> LabelledImages:
    """All samples of `shards` (or `shots` per class, chosen with `seed`), grouped into classes.
    `rest`: the samples the same draw of `shots` leaves out instead (an in-domain test set that
    never holds a shot); classes with nothing left are left out.
    `max_classes` / `only_classes`: see `pick_classes`; both apply before any image is decoded."""
    skips: Counter = Counter()
    by_class: dict[str, list[dict]] = defaultdict(list)
    names: dict[str, dict[str, list[str]]] = {}
    seen = 0
    for url in expand_shards(shards):
        for sample in iter_raw_samples(url, skips):
            if max_samples and seen >= max_samples:
                break
            try:
                meta = parse_meta(sample, url)
            except ValueError as err:
                skips["bad_json"] += 1
                log.warning("%s", err)
                continue
            label = str(meta.get("label", sample["__key__"]))
            found = _class_names(meta)
            if not found and label not in names:
                skips["no_class_name"] += 1
                continue
            seen += 1
            sample["__where__"] = f"{url}#{sample['__key__']}"
            by_class[label].append(sample)
            for lang, values in found.items():  # union of names over the class's samples
                merged = names.setdefault(label, {}).setdefault(lang, [])
                merged.extend(v for v in values if v not in merged)
    if not by_class:
        raise ValueError(f"no labelled samples with class names in {shards}")
    rng = random.Random(seed)
    classes = pick_classes(sorted(by_class), max_classes, only_classes)
    if not classes:
        raise ValueError(f"no labelled samples of the wanted classes in {shards}")
    if rest and not shots:
        raise ValueError("read_labelled: rest=True needs shots (the draw whose rest is wanted)")
    images, labels, keys = [], [], []
    short = 0
    kept_classes = []
    for label in classes:
        samples = by_class[label]
        if shots:
            drawn = rng.sample(samples, min(shots, len(samples)))
            short += len(drawn) < shots
            picked = {id(s) for s in drawn}
            samples = [s for s in samples if id(s) not in picked] if rest else drawn
        if not samples:
            continue
        index = len(kept_classes)
        added = 0
        for sample in samples:
            try:
                images.append(preprocess(decode_image(sample)))
            except Exception as err:  # counted skip: corrupt image
                skips["bad_image"] += 1
                log.warning("skipping %s: %s", sample.get("__key__"), err)
                continue
            labels.append(index)
            keys.append(sample["__where__"])
            added += 1
        if added:
            kept_classes.append(label)
    if shots and short:
        log.info("%d of %d classes have fewer than %d images (all of theirs are %s)", short, len(classes), shots,
                 "shots: none left to test" if rest else "used")
    if skips:
        log.warning("labelled set %s: skipped %s", shards, dict(skips))
    if not images:
        raise ValueError(f"no usable labelled images in {shards}" + (" beyond the shots" if rest else ""))
    return LabelledImages(torch.stack(images), torch.tensor(labels), kept_classes, [names[c] for c in kept_classes],
                          skips, keys)


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
    skips = skips if skips is not None else Counter()
    images, labels = [], []
    for path, label in records.items[:max_samples] if max_samples else records.items:
        try:
            images.append(preprocess(open_rgb(path)))
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
