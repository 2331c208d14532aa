"""Zero-shot classification per language of class names: hand-written prompts vs the learned
CoOp context, and the cross-lingual gap (accuracy with English names minus each language's)."""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from ..data.classes import LabelledImages
from .templates import template_for

log = logging.getLogger(__name__)

# encode(names, class_index) -> normalised (C, d) class embeddings
ClassEncoder = Callable[[list[str], torch.Tensor], torch.Tensor]


@torch.no_grad()
def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                       ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Top-k accuracy of nearest class prompt; class_emb (C, d), labels (N,) class indices."""
    scores = image_emb @ class_emb.T
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"acc@{k}"] = (top == labels[:, None]).any(1).float().mean().item()
    return out


@torch.no_grad()
def accuracy_by_language(image_emb: torch.Tensor, data: LabelledImages,
                         encoders_for: Callable[[str], dict[str, ClassEncoder]],
                         languages: Optional[Sequence[str]] = None, reference: str = "en") -> list[dict]:
    """One row per language: classes/images with a name in it, then `acc <encoder>` and
    `gap <encoder>` (reference-language accuracy minus this language's) for each of the
    language's encoders (`encoders_for(language)`, e.g. a template in that language)."""
    langs = list(languages) if languages else data.languages()
    rows = []
    for lang in langs:
        kept = [c for c in range(len(data.classes)) if data.name_in(c, lang)]
        if not kept:
            log.warning("zero-shot: no class has a %s name; language skipped", lang)
            continue
        remap = torch.full((len(data.classes),), -1, dtype=torch.long)
        remap[torch.tensor(kept)] = torch.arange(len(kept))
        labels = remap[data.labels]
        images = labels >= 0
        names = [data.name_in(c, lang) for c in kept]
        row = {"language": lang, "classes": len(kept), "images": int(images.sum())}
        for label, encode in encoders_for(lang).items():
            class_emb = encode(names, torch.tensor(kept)).cpu()
            row[f"acc {label}"] = zero_shot_accuracy(image_emb[images], class_emb, labels[images])["acc@1"]
        rows.append(row)
    ref = next((r for r in rows if r["language"] == reference), None)
    for row in rows:
        for key in [k for k in row if k.startswith("acc ")]:
            row["gap " + key[4:]] = ref[key] - row[key] if ref and key in ref else float("nan")
    return rows


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
