"""Where a shard sample's captions come from (`data.captions`), for the shard layouts users have:

- proalign's own: `<key>.json` with `{"captions": {"en": [...], "de": [...]}}`;
- img2dataset / open_clip: `<key>.txt` (the caption) + `<key>.json` (metadata, `caption` among it);
- multi-caption JSON (DreamLIP-style re-captions such as `shortIB_captions` / `longIB_captions`
  next to the raw alt-text `caption`).

A caption field names a member (`txt`) or a JSON field (a dotted path for nested objects), its
language (a mapping field such as `captions` carries its own) and its role: `short`, `long` or
`raw` (the alt-text, the reference's "noise" caption). With no fields configured (`auto`), a
sample's captions are its JSON `captions` mapping if it has one, else its `.txt`, else its JSON
`caption`, all `short` and English unless the mapping says otherwise.

Caption ids are `key|language|index` for short captions (as before roles existed) and
`key|language|<role><index>` for the others (`raw0`, `long1`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Iterable, NamedTuple, Optional, Sequence

log = logging.getLogger(__name__)

ROLES = ("short", "long", "raw")


@dataclass
class CaptionField:
    """One source of captions in a shard sample (`data.captions[i]`)."""
    field: str                # "txt" (the sample's .txt member) or a JSON field, dotted for nested ones
    language: str = "en"      # of a text or list field; a mapping field ({lang: [...]}) gives its own
    role: str = "short"       # short | long | raw

    def __post_init__(self):
        if not self.field or not isinstance(self.field, str):
            raise ValueError("field: must name a member (txt) or a JSON field")
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {list(ROLES)}, got {self.role!r}")


class CaptionSpec:
    """The configured caption fields (none: `auto`); `read(sample, where)` -> (metadata with
    `captions` {language: [text]} and `caption_roles` {language: [role]})."""

    def __init__(self, fields: Iterable[CaptionField | dict] = ()):
        self.fields = [f if isinstance(f, CaptionField) else CaptionField(**f) for f in fields]

    @property
    def key(self) -> str:
        """What a cache of these captions depends on ("auto" for the default)."""
        return json.dumps([asdict(f) for f in self.fields], sort_keys=True) if self.fields else "auto"

    def read(self, sample: dict, where: str) -> dict:
        meta = _json_of(sample, where)
        captions: dict[str, list[str]] = {}
        roles: dict[str, list[str]] = {}

        def add(language: str, texts, role: str) -> None:
            for text in [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []:
                if isinstance(text, str) and text.strip():
                    captions.setdefault(language, []).append(text.strip())
                    roles.setdefault(language, []).append(role)
        fields = self.fields or _auto_fields(sample, meta)
        for source in fields:
            value = _field_value(sample, meta, source.field)
            if isinstance(value, dict):
                for language, texts in value.items():
                    add(str(language), texts, source.role)
            elif value is not None:
                add(source.language, value, source.role)
        if not self.fields and not fields:
            raise ValueError(f"{where}: sample {sample.get('__key__')!r} has no captions (no JSON `captions`, "
                             "no .txt, no JSON `caption`); set data.captions to the fields your shards use")
        return {**meta, "captions": captions, "caption_roles": roles}


def _json_of(sample: dict, where: str) -> dict:
    if "json" not in sample:
        return {}
    meta = json.loads(sample["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: sample {sample.get('__key__')!r}: the .json is a {type(meta).__name__}, "
                         f"not an object")
    return meta


def _auto_fields(sample: dict, meta: dict) -> list[CaptionField]:
    if "captions" in meta:
        if not isinstance(meta["captions"], dict):
            raise ValueError(f"sample {sample.get('__key__')!r}: 'captions' must map language -> list")
        return [CaptionField("captions")]
    if "txt" in sample:
        return [CaptionField("txt")]
    if "caption" in meta:
        return [CaptionField("caption")]
    return []


def _field_value(sample: dict, meta: dict, field: str):
    if field == "txt":
        raw = sample.get("txt")
        return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    value = meta
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class CaptionId(NamedTuple):
    """A caption's id: its sample's key, its language and its tag (`0`, `1`, ... for short
    captions; `long0`, `raw0`, ... for the other roles), written `key|language|tag`. The one
    format and the one parse: a key may hold `|` (the last two fields are split off); a language
    may not (refused when the id is made)."""
    key: str
    language: str
    tag: str

    @classmethod
    def of(cls, key: str, language: str, role: str, index: int) -> "CaptionId":
        if "|" in language:
            raise ValueError(f"language {language[:40]!r} holds '|', which caption ids use as a separator")
        return cls(key, language, str(index) if role == "short" else f"{role}{index}")

    @classmethod
    def parse(cls, text: str) -> "CaptionId":
        parts = text.rsplit("|", 2)
        if len(parts) != 3:
            raise ValueError(f"not a caption id (key|language|tag): {text[:80]!r}")
        return cls(*parts)

    @property
    def role(self) -> str:
        return self.tag.rstrip("0123456789") or "short"

    def __str__(self) -> str:
        return f"{self.key}|{self.language}|{self.tag}"


def caption_id(key: str, language: str, role: str, index: int) -> str:
    return str(CaptionId.of(key, language, role, index))


def caption_role(caption_id_: str) -> str:
    """The role a caption id says (`short` for a plain index)."""
    return CaptionId.parse(caption_id_).role


def usable_text(text) -> bool:
    """A caption worth encoding: a string a tokenizer can take (valid UTF-8: a lone surrogate from a
    JSON escape is not) with something left once whitespace and invisible format characters
    (zero-width spaces, byte-order marks) are removed."""
    import unicodedata
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


def caption_items(meta: dict, key: str, languages: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
    """[(caption id, text)] of a sample's metadata (as `CaptionSpec.read` returns it, or a bare
    {"captions": {...}} mapping), numbered per language and role; captions that are not
    `usable_text` (empty, invisible, or not valid UTF-8) left out (a sample left with none is the
    caller's counted `no_caption` skip)."""
    out = []
    roles = meta.get("caption_roles") or {}
    for lang, texts in meta["captions"].items():
        if languages and lang not in languages:
            continue
        if "|" in lang:  # cannot be written in a caption id; the sample keeps its other languages
            log.warning("sample %r: skipping captions of language %r ('|' is the caption id separator)",
                        key[:80], lang[:40])
            continue
        texts = [texts] if isinstance(texts, str) else texts
        lang_roles = roles.get(lang) or ["short"] * len(texts)
        counters: dict[str, int] = {}
        for text, role in zip(texts, lang_roles):
            if not usable_text(text):
                counters[role] = counters.get(role, 0) + 1
                continue
            index = counters.get(role, 0)
            counters[role] = index + 1
            out.append((caption_id(key, lang, role, index), text.strip()))
    return out
