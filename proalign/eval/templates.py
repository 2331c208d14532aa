"""Hand-written zero-shot prompts: "a photo of a {}." in the languages of the embedded data.

These are the baseline the CoOp head must beat. A language missing here (and in
`coop.templates`) falls back to the English template, and that fallback is logged.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PHOTO_OF = {
    "en": "a photo of a {}.",
    "de": "ein Foto von {}.",
    "fr": "une photo de {}.",
    "es": "una foto de {}.",
    "it": "una foto di {}.",
    "pt": "uma foto de {}.",
    "nl": "een foto van {}.",
    "pl": "zdjęcie: {}.",
    "ru": "фотография: {}.",
    "uk": "фотографія: {}.",
    "cs": "fotografie: {}.",
    "sv": "ett foto av {}.",
    "fi": "valokuva: {}.",
    "tr": "bir {} fotoğrafı.",
    "el": "μια φωτογραφία: {}.",
    "he": "תמונה של {}.",
    "ar": "صورة {}.",
    "fa": "عکسی از {}.",
    "hi": "{} की एक तस्वीर।",
    "bn": "{} এর একটি ছবি।",
    "th": "ภาพถ่ายของ{}",
    "vi": "một bức ảnh về {}.",
    "id": "sebuah foto {}.",
    "sw": "picha ya {}.",
    "am": "የ{} ፎቶ።",
    "zh": "一张{}的照片。",
    "ja": "{}の写真。",
    "ko": "{}의 사진.",
}


def template_for(language: str, overrides: dict[str, str]) -> str:
    """The configured template for `language`, else the built-in one, else English (logged)."""
    if language in overrides:
        return overrides[language]
    if language in PHOTO_OF:
        return PHOTO_OF[language]
    log.warning("no hand-written template for language %r: using the English one", language)
    return overrides.get("en", PHOTO_OF["en"])


# An English ensemble for zero-shot classification (CLIP averages the normalised embeddings of many
# phrasings of each class); the single-template default stays PHOTO_OF.
ENGLISH_ENSEMBLE = [
    "a photo of a {}.",
    "a picture of the {}.",
    "an image showing a {}.",
    "a close-up photo of the {}.",
    "a drawing of a {}.",
    "an icon of a {}.",
    "a rendering of the {}.",
    "a {} in a photo.",
]


def templates_for(language: str, overrides: dict, ensemble: bool = False) -> list[str]:
    """The templates of `language`: `overrides[language]` (a string or a list), else the English
    ensemble (English, `ensemble`) or the built-in single template."""
    if language in overrides:
        value = overrides[language]
        return [value] if isinstance(value, str) else list(value)
    if ensemble and language == "en":
        return list(ENGLISH_ENSEMBLE)
    return [template_for(language, {})]
