"""Text-only transfer measure: does a concept's name in language L land on the CLIP teacher's
embedding of its English name? It isolates stage 1 (the distillation) from the image tower.

For each language, each concept's name in that language is a query; the gallery is the teacher's
English-name embedding of every concept; a hit is the query's own concept in the top k.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.captions import CaptionId
from .retrieval import recall_uncertainty, retrieval_metrics


def _by_key(ids: Sequence[str], feats: torch.Tensor, lang: str) -> dict[str, torch.Tensor]:
    """{sample key: row} for the first caption of `lang` (ids are `key|lang|index`)."""
    out = {}
    for cid, row in zip(ids, feats):
        key, language, index = CaptionId.parse(cid)
        if language == lang and index == "0":
            out[key] = row
    return out


@torch.no_grad()
def text_transfer_rows(llm_ids: Sequence[str], llm_feats: torch.Tensor, clip_ids: Sequence[str],
                       clip_feats: torch.Tensor, languages: Sequence[str],
                       students: dict[str, Optional[Callable[[torch.Tensor], torch.Tensor]]],
                       dataset: str = "", ks: Sequence[int] = (1, 5)) -> list[dict]:
    """Rows (model, language, R@k ± s.e., chance) of name-in-L -> teacher's English name.

    `students[label]` maps LLM features to CLIP space (the adapter); None means the CLIP text
    tower itself (its features of the same non-English names)."""
    english = _by_key(clip_ids, clip_feats, "en")
    keys = sorted(english)
    if not keys:
        raise ValueError(f"text transfer {dataset}: no English names in the teacher cache")
    gallery = F.normalize(torch.stack([english[k] for k in keys]).float(), dim=-1)
    position = {k: i for i, k in enumerate(keys)}
    rows = []
    for lang in languages:
        llm = _by_key(llm_ids, llm_feats, lang)
        clip = _by_key(clip_ids, clip_feats, lang)
        present = [k for k in keys if k in llm and k in clip]
        if not present:
            continue
        owners = torch.tensor([position[k] for k in present])
        for label, student in students.items():
            if student is None:
                queries = torch.stack([clip[k] for k in present]).float()
            else:
                queries = student(torch.stack([llm[k] for k in present]).float())
            metrics = {k: v for k, v in retrieval_metrics(gallery, F.normalize(queries, dim=-1), owners, ks).items()
                       if k.startswith("t2i")}
            metrics.update(recall_uncertainty(metrics, owners, len(keys)))
            rows.append({"dataset": dataset, "model": label, "language": lang, "images": len(present),
                         "captions": len(present), "concepts": len(keys), **metrics})
    return rows
