"""Labelled image sets for few-shot / zero-shot classification, read from image-text shards.

A sample's class is its json `label` (else its key). Class names per language come from
`class_names` (`{"en": ["cat"], "de": ["Katze"]}`) when present, else from its captions, so a
class may have names in several languages. K shots per class are drawn with a fixed seed.
"""
from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .shards import decode_image, expand_shards, iter_raw_samples, parse_meta

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    images: torch.Tensor               # (N, 3, H, W) preprocessed
    labels: torch.Tensor               # (N,) index into `classes`
    classes: list[str]                 # class ids
    names: list[dict[str, list[str]]]  # per class: language -> names
    skips: Counter = field(default_factory=Counter)

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
        return LabelledImages(self.images[rows], remap[self.labels][rows], [self.classes[i] for i in kept],
                              [self.names[i] for i in kept], self.skips)


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
                  only_classes: Optional[set] = None) -> LabelledImages:
    """All samples of `shards` (or `shots` per class, chosen with `seed`), grouped into classes.
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
    images, labels = [], []
    short = 0
    for index, label in enumerate(classes):
        samples = by_class[label]
        if shots:
            samples = rng.sample(samples, min(shots, len(samples)))
            short += len(samples) < shots
        for sample in samples:
            try:
                images.append(preprocess(decode_image(sample)))
            except Exception as err:  # counted skip: corrupt image
                skips["bad_image"] += 1
                log.warning("skipping %s: %s", sample.get("__key__"), err)
                continue
            labels.append(index)
    if shots and short:
        log.info("%d of %d classes have fewer than %d images (all of theirs are used)", short, len(classes), shots)
    if skips:
        log.warning("labelled set %s: skipped %s", shards, dict(skips))
    return LabelledImages(torch.stack(images), torch.tensor(labels), classes, [names[c] for c in classes], skips)
