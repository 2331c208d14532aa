"""Zero-shot classification per language of class names: hand-written prompts vs the learned
CoOp context, and the cross-lingual gap (accuracy with English names minus each language's)."""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from ..data.classification import LabelledImages
from .templates import template_for

log = logging.getLogger(__name__)

# encode(names, class_index) -> normalised (C, d) class embeddings
ClassEncoder = Callable[[list[str], torch.Tensor], torch.Tensor]


@torch.no_grad()
def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """clip_benchmark's metrics: top-1 and top-5 accuracy, and mean per-class recall (the
    top-1 recall of each class present in `labels`, averaged over those classes); plus the
    binomial standard error of top-1."""
    n = len(labels)
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hit1 = (top[:, 0] == labels).float()
    recalls = [hit1[labels == c].mean().item() for c in labels.unique().tolist()]
    top1 = hit1.mean().item()
    return {"top1": top1, "top1_se": (top1 * (1 - top1) / n) ** 0.5, "top5": (top == labels[:, None]).any(1).float().mean().item(),
            "mean_per_class_recall": sum(recalls) / len(recalls), "top1_chance": 1.0 / scores.shape[1]}


def ensemble_encoder(encode_text: Callable[[list[str]], torch.Tensor], templates: Sequence[str]) -> ClassEncoder:
    """Class embeddings from templates, as CLIP's zero-shot evaluation builds them: each class's
    templates filled, encoded and normalised, averaged, and normalised again."""
    def encode(names, _index):
        texts = [t.format(n) for n in names for t in templates]
        emb = torch.nn.functional.normalize(encode_text(texts).float(), dim=-1)
        emb = emb.view(len(names), len(templates), -1).mean(1)
        return torch.nn.functional.normalize(emb, dim=-1)
    return encode


def _language_subset(data: LabelledImages, lang: str):
    """(class indices named in `lang`, their names, images of those classes, remapped labels)."""
    kept = [c for c in range(len(data.classes)) if data.name_in(c, lang)]
    remap = torch.full((len(data.classes),), -1, dtype=torch.long)
    if kept:
        remap[torch.tensor(kept)] = torch.arange(len(kept))
    labels = remap[data.labels]
    return kept, [data.name_in(c, lang) for c in kept], labels >= 0, labels


@torch.no_grad()
def classify_by_language(image_emb: torch.Tensor, data: LabelledImages,
                         encoders_for: Callable[[str], dict[str, ClassEncoder]],
                         languages: Optional[Sequence[str]] = None, dataset: str = "") -> list[dict]:
    """One row per (language, encoder): the classes with a name in that language, their images,
    and `classification_metrics`."""
    rows = []
    for lang in list(languages) if languages else data.languages():
        kept, names, images, labels = _language_subset(data, lang)
        if not kept or not images.any():
            log.warning("zero-shot %s: no class (with images) has a %s name; language skipped", dataset, lang)
            continue
        for label, encode in encoders_for(lang).items():
            class_emb = encode(names, torch.tensor(kept)).cpu()
            scores = image_emb[images] @ class_emb.T
            rows.append({"dataset": dataset, "model": label, "language": lang, "classes": len(kept),
                         "images": int(images.sum()), **classification_metrics(scores, labels[images])})
    return rows


@torch.no_grad()
def accuracy_by_language(image_emb: torch.Tensor, data: LabelledImages,
                         encoders_for: Callable[[str], dict[str, ClassEncoder]],
                         languages: Optional[Sequence[str]] = None, reference: str = "en") -> list[dict]:
    """One row per language: classes/images with a name in it, then `acc <encoder>` (top-1) and
    `gap <encoder>` (reference-language accuracy minus this language's) for each of the
    language's encoders (`encoders_for(language)`, e.g. a template in that language)."""
    rows: dict[str, dict] = {}
    for r in classify_by_language(image_emb, data, encoders_for, languages):
        row = rows.setdefault(r["language"], {"language": r["language"], "classes": r["classes"], "images": r["images"]})
        row[f"acc {r['model']}"] = r["top1"]
    rows_list = list(rows.values())
    ref = rows.get(reference)
    for row in rows_list:
        for key in [k for k in row if k.startswith("acc ")]:
            row["gap " + key[4:]] = ref[key] - row[key] if ref and key in ref else float("nan")
    return rows_list


def handwritten_encoder(encode_text: Callable[[list[str]], torch.Tensor], language: str,
                        templates: dict[str, str]) -> ClassEncoder:
    template = template_for(language, templates)
    return lambda names, _index: encode_text([template.format(n) for n in names])


def accuracy_handwritten_vs_learned(image_emb: torch.Tensor, data: LabelledImages, model, templates: dict,
                                    languages: Optional[Sequence[str]] = None,
                                    class_index_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                                    learned: bool = True) -> list[dict]:
    """Rows with `acc hand-written` (and `acc learned context` when `learned`), per language.
    `class_index_of` maps data class indices to a class-specific context's indices."""
    def learned_encoder(names, index):
        return model.encode_text(names, prompt=True, class_index=class_index_of(index) if class_index_of else None)

    def encoders_for(lang):
        encoders = {"hand-written": handwritten_encoder(model.encode_text, lang, templates)}
        if learned:
            encoders["learned context"] = learned_encoder
        return encoders
    return accuracy_by_language(image_emb, data, encoders_for, languages)
