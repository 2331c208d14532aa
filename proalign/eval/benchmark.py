"""Per-language retrieval over image-text shards for several text encoders."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Optional, Sequence

import torch

from ..data.shards import caption_items, expand_shards, load_image_text
from .retrieval import recall_uncertainty, retrieval_metrics

log = logging.getLogger(__name__)


def languages_present(metas: dict) -> list[str]:
    counts = Counter(lang for meta in metas.values() for lang in meta["captions"])
    return sorted(counts)


@torch.no_grad()
def evaluate_retrieval(image_encoder: Callable[[torch.Tensor], torch.Tensor],
                       text_encoders: dict[str, Callable[[list[str], list[str]], torch.Tensor]],
                       shards, preprocess, languages: Optional[Sequence[str]] = None,
                       max_samples: Optional[int] = None, dataset: str = "",
                       truncation: Optional[dict[str, Callable[[list[str]], int]]] = None) -> list[dict]:
    """One row per (encoder, language): recall@1/5/10 both ways over images captioned in that language.

    Each text encoder is called as encode(texts, caption_ids), so it may serve cached features.
    `truncation[name](texts)` counts the captions that encoder cuts (row field `truncated`)."""
    skips: Counter = Counter()
    images, keys, metas = load_image_text(expand_shards(shards), preprocess, max_samples=max_samples, skips=skips)
    if skips:
        log.warning("eval %s: skipped %s", dataset, dict(skips))
    if not keys:
        raise ValueError(f"eval {dataset}: no readable samples in {shards}")
    return evaluate_loaded(image_encoder, text_encoders, images, keys, metas, languages, dataset, truncation)


@torch.no_grad()
def evaluate_loaded(image_encoder, text_encoders, images: torch.Tensor, keys: list[str], metas: dict,
                    languages: Optional[Sequence[str]] = None, dataset: str = "",
                    truncation: Optional[dict[str, Callable[[list[str]], int]]] = None) -> list[dict]:
    """`evaluate_retrieval` on images and caption records already in memory."""
    image_emb = torch.cat([image_encoder(images[i:i + 256]) for i in range(0, len(images), 256)]).cpu()
    langs = list(languages) if languages else languages_present(metas)
    rows = []
    for lang in langs:
        texts, ids, owner = [], [], []
        for idx, key in enumerate(keys):
            for cid, text in caption_items(metas[key], key, [lang]):
                texts.append(text)
                ids.append(cid)
                owner.append(idx)
        if not texts:
            log.warning("eval %s: no %s captions, language skipped", dataset, lang)
            continue
        used = sorted(set(owner))
        remap = {old: new for new, old in enumerate(used)}
        target = torch.tensor([remap[o] for o in owner])
        for name, encode in text_encoders.items():
            text_emb = encode(texts, ids).cpu()
            metrics = retrieval_metrics(image_emb[used], text_emb, target)
            metrics.update(recall_uncertainty(metrics, target, len(used)))
            row = {"dataset": dataset, "model": name, "language": lang, "images": len(used),
                   "captions": len(texts), **metrics}
            if truncation and name in truncation:
                row["truncated"] = int(truncation[name](texts))
                if row["truncated"]:
                    log.info("eval %s/%s: %s cut %d of %d captions", dataset, lang, name, row["truncated"], len(texts))
            rows.append(row)
    return rows
