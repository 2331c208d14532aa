"""The one retrieval evaluator: text towers × eval sets -> rows (one per tower and language).

Used by stage 2's held-out evaluation, `proalign eval` and `proalign demo`; `report.py` turns the
rows into results.md and plots. A text tower is any `encode(texts, caption_ids)`: the CLIP text
tower, the LLM embedder + adapter (live, or from the embedding cache), or the CoOp context.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..data.shards import caption_items
from .retrieval import recall_uncertainty, retrieval_metrics

log = logging.getLogger(__name__)
CLIP_TOWER = "CLIP text tower"
IMAGE_BATCH = 256
TEXT_CHUNK = 1024  # captions per text-tower call (the progress bar moves per chunk)


@dataclass
class EvalSet:
    """Decoded images with their caption records; `languages` None: every language present."""
    name: str
    images: torch.Tensor
    keys: list[str]
    metas: dict
    languages: Optional[list[str]] = None


@dataclass
class TextTower:
    """A named text encoder, `encode(texts, caption_ids) -> rows`, and how many captions it cuts."""
    name: str
    encode: Callable[[list[str], list[str]], torch.Tensor]
    count_truncated: Optional[Callable[[list[str]], int]] = None


def load_eval_set(name: str, fmt: str, path, preprocess, options=None, languages: Optional[Sequence[str]] = None,
                  max_samples: Optional[int] = None) -> EvalSet:
    """An eval set in any registered format, decoded; unreadable samples are skipped, counted and logged."""
    from ..data.datasets import load_dataset
    skips: Counter = Counter()
    images, keys, metas = load_dataset(fmt, path, preprocess, options, languages or None, max_samples, skips)
    if skips:
        log.warning("eval %s: skipped %s", name, dict(skips))
    if not keys:
        raise ValueError(f"eval dataset {name!r}: no readable images in {path}")
    return EvalSet(name, images, keys, metas, list(languages) if languages else None)


def load_shard_set(name: str, shards, preprocess, languages: Optional[Sequence[str]] = None,
                   max_samples: Optional[int] = None, captions: Sequence = ()) -> EvalSet:
    """Shards as an eval set; `captions`: the caption fields (`data.captions`; empty: auto)."""
    from ..data.readers import ShardOptions
    return load_eval_set(name, "shards", shards, preprocess, ShardOptions(list(captions)), languages, max_samples)


def clip_text_tower(model, name: str = CLIP_TOWER,
                    cache: Optional[Callable[[Sequence[str], Sequence[str]], torch.Tensor]] = None) -> TextTower:
    """CLIP's own text tower; with `cache` ((ids, texts) -> rows of the teacher cache, e.g. a
    CachedTextFeatures) its cached features of the same captions."""
    if cache is None:
        encode = lambda texts, ids: model.encode_text_clip(texts)  # noqa: E731
    else:
        encode = lambda texts, ids: torch.nn.functional.normalize(cache(ids, texts).float(), dim=-1)  # noqa: E731
    return TextTower(name, encode, functools.partial(model.count_truncated, tower="clip"))


def llm_text_tower(model, name: str, cache: Optional[Callable[[Sequence[str], Sequence[str]], torch.Tensor]] = None,
                   batch_size: int = 64) -> TextTower:
    """LLM embedder + adapter; with `cache` ((ids, texts) -> LLM rows, e.g. a CachedTextFeatures),
    the adapter runs on its rows."""
    if cache is None:
        encode = lambda texts, ids: model.encode_text(texts, batch_size=batch_size)  # noqa: E731
    else:
        def encode(texts, ids):
            with torch.no_grad():
                return model.encode_llm_features(cache(ids, texts).to(model.adapter.proj.weight.device))
    return TextTower(name, encode, functools.partial(model.count_truncated, tower="llm"))


def prompt_text_tower(model, name: str, batch_size: int = 64) -> TextTower:
    """The learned CoOp context through the live embedder, then the adapter."""
    return TextTower(name, lambda texts, ids: model.encode_text(texts, prompt=True, batch_size=batch_size),
                     functools.partial(model.count_truncated, tower="prompt"))


def image_encoder(model) -> Callable[[torch.Tensor], torch.Tensor]:
    device = next(model.clip.parameters()).device
    return lambda images: model.encode_image(images.to(device))


def languages_present(metas: dict) -> list[str]:
    return sorted(Counter(lang for meta in metas.values() for lang in meta["captions"]))


class Evaluator:
    """Eval sets decoded once; `evaluate` runs any image encoder and text towers on all of them."""

    def __init__(self, sets: Sequence[EvalSet], progress: bool = False):
        self.sets = {s.name: s for s in sets}
        self.progress = progress

    @torch.no_grad()
    def evaluate(self, encode_image: Callable[[torch.Tensor], torch.Tensor], towers: Sequence[TextTower],
                 names: Optional[Sequence[str]] = None) -> list[dict]:
        rows = []
        for name in list(self.sets) if names is None else names:
            s = self.sets[name]
            rows += evaluate_set(encode_image, towers, s, self.progress)
        return rows


def _captions_by_language(s: EvalSet) -> dict[str, tuple[list[str], list[str], list[int]]]:
    """language -> (texts, caption ids, owning image index), for the languages that have captions."""
    out = {}
    for lang in s.languages or languages_present(s.metas):
        texts, ids, owner = [], [], []
        for idx, key in enumerate(s.keys):
            for cid, text in caption_items(s.metas[key], key, [lang]):
                texts.append(text)
                ids.append(cid)
                owner.append(idx)
        if texts:
            out[lang] = (texts, ids, owner)
        else:
            log.warning("eval %s: no %s captions, language skipped", s.name, lang)
    return out


@torch.no_grad()
def evaluate_set(encode_image, towers: Sequence[TextTower], s: EvalSet, progress: bool = False) -> list[dict]:
    """One row per (tower, language): R@1/5/10 both ways (± s.e., chance) over the images
    captioned in that language, and how many of those captions the tower cut."""
    from tqdm.auto import tqdm
    image_bar = tqdm(total=len(s.images), desc=f"{s.name}: images", unit="img", disable=not progress, leave=False)
    parts = []
    for i in range(0, len(s.images), IMAGE_BATCH):
        parts.append(encode_image(s.images[i:i + IMAGE_BATCH]).cpu())
        image_bar.update(len(parts[-1]))
    image_bar.close()
    image_emb = torch.cat(parts)
    by_language = _captions_by_language(s)
    text_bar = tqdm(total=len(towers) * sum(len(v[0]) for v in by_language.values()), desc=f"{s.name}: captions",
                    unit="cap", disable=not progress, leave=False)
    rows = []
    for lang, (texts, ids, owner) in by_language.items():
        used = sorted(set(owner))
        remap = {old: new for new, old in enumerate(used)}
        target = torch.tensor([remap[o] for o in owner])
        for tower in towers:
            chunks = []
            for start in range(0, len(texts), TEXT_CHUNK):
                chunks.append(tower.encode(texts[start:start + TEXT_CHUNK], ids[start:start + TEXT_CHUNK]).cpu())
                text_bar.update(len(chunks[-1]))
            text_emb = torch.cat(chunks)
            metrics = retrieval_metrics(image_emb[used], text_emb, target)
            metrics.update(recall_uncertainty(metrics, target, len(used)))
            row = {"dataset": s.name, "model": tower.name, "language": lang, "images": len(used),
                   "captions": len(texts), **metrics}
            if tower.count_truncated is not None:
                row["truncated"] = int(tower.count_truncated(texts))
                if row["truncated"]:
                    log.info("eval %s/%s: %s cut %d of %d captions", s.name, lang, tower.name, row["truncated"],
                             len(texts))
            rows.append(row)
    text_bar.close()
    return rows


def mean_recalls(rows: list[dict]) -> dict:
    """The plain mean over rows (languages) of every R@k."""
    keys = [k for k in rows[0] if "R@" in k and not k.endswith(("_se", "_chance"))]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}
