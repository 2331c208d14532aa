#!/usr/bin/env python
"""Rebuild the embedded demo shards from Debian and npm packages (re-runnable, deterministic).

Needs: unicode-cldr-core, fonts-noto-color-emoji, openclipart-svg (apt), cairosvg (pip) and, for
`styles`, npm (the Twemoji and Fluent UI Emoji artwork packages are fetched with `npm pack`).
    python data_shards/build.py [--out data_shards] [--size 64] [--parts emoji clipart styles]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import unicodedata
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from proalign.data.writer import write_shards  # noqa: E402

CLDR = Path("/usr/share/unicode/cldr/common/annotations")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLIPART = Path("/usr/share/openclipart/svg")
LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "uk", "cs", "sv", "fi", "tr", "el",
             "he", "ar", "fa", "hi", "bn", "th", "vi", "id", "sw", "am", "zh", "ja", "ko"]
DC = "{http://purl.org/dc/elements/1.1/}"


CLDR_DERIVED = Path("/usr/share/unicode/cldr/common/annotationsDerived")
# npm artwork packages (name, version), pinned so a rebuild is byte-identical.
NPM_ARTWORK = {"twemoji": ("emoji-datasource-twitter", "16.0.0"), "fluent": ("fluentui-emoji", "1.3.0")}
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
TRAIN_STYLES = ["noto", "fluent-flat", "fluent-3d", "fluent-high-contrast"]
HELD_OUT_STYLE = "twemoji"
FLUENT_FOLDERS = {"fluent-flat": "flat", "fluent-3d": "modern", "fluent-high-contrast": "high-contrast"}


def cldr_names(lang: str) -> dict[str, str]:
    root = ET.parse(CLDR / f"{lang}.xml").getroot()
    return {a.get("cp"): a.text.strip() for a in root.iter("annotation")
            if a.get("type") == "tts" and a.text and a.text.strip() not in ("↑↑↑", "")}


def render_emoji(char: str, size: int) -> Image.Image | None:
    font = ImageFont.truetype(str(EMOJI_FONT), 109)
    canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((80, 80), char, font=font, embedded_color=True, anchor="mm")
    box = canvas.getbbox()
    if box is None:  # the font has no glyph for it
        return None
    return canvas.crop(box).resize((size, size), Image.BICUBIC)


def emoji_samples(size: int, test_fraction: float, seed: int):
    names = {lang: cldr_names(lang) for lang in LANGUAGES}
    chars = sorted(c for c in names["en"] if len(c) == 1 and ord(c) > 0x2000)
    random.Random(seed).shuffle(chars)
    n_test = int(len(chars) * test_fraction)
    splits = {"test": chars[:n_test], "train": chars[n_test:]}
    out = {}
    for split, members in splits.items():
        samples = []
        for char in sorted(members):
            image = render_emoji(char, size)
            if image is None:
                continue
            langs = ["en"] if split == "train" else LANGUAGES
            captions = {lang: [names[lang][char]] for lang in langs if char in names[lang]}
            samples.append({"key": f"emoji_{ord(char):05x}", "image": image,
                            "meta": {"captions": captions, "label": f"U+{ord(char):04X}"}})
        out[split] = samples
    return out


# ----------------------------------------------------------------------------- multi-style emoji

def cldr_annotations(lang: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(names, keywords) of every annotated emoji, sequences included (CLDR `annotations` +
    `annotationsDerived`), keyed by the emoji without U+FE0F."""
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for folder in (CLDR, CLDR_DERIVED):
        path = folder / f"{lang}.xml"
        if not path.exists():
            continue
        for a in ET.parse(path).getroot().iter("annotation"):
            text = (a.text or "").strip()
            if not text or text == "↑↑↑":
                continue
            cp = a.get("cp").replace("\ufe0f", "")
            if a.get("type") == "tts":
                names[cp] = text
            else:
                keywords[cp] = [k.strip() for k in text.split("|") if k.strip()]
    return names, keywords


def npm_package(name: str, version: str, cache: Path) -> Path:
    """The unpacked `package/` folder of an npm package, fetched once with `npm pack`."""
    folder = cache / f"{name}-{version}"
    if not (folder / "package").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        tgz = cache / f"{name}-{version}.tgz"
        if not tgz.exists():
            subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(cache)], check=True,
                           stdout=subprocess.DEVNULL)
        with tarfile.open(tgz) as tar:
            tar.extractall(folder, filter="data")
    return folder / "package"


def fluent_slug(name: str) -> str:
    """Fluent UI Emoji file stem of a CLDR English name (`1st place medal` -> `1st-place-medal`)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.replace("’", "").replace("'", "")).strip("-")


def split_concepts(concepts: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, test-concept): a seeded split of concept ids; every concept lands in exactly one."""
    order = sorted(concepts)
    random.Random(seed).shuffle(order)
    n_test = int(round(len(order) * test_fraction))
    return sorted(order[n_test:]), sorted(order[:n_test])


def _render_noto(char: str, size: int) -> Image.Image | None:
    """Noto Color Emoji with complex-script layout (ZWJ sequences, flags, keycaps as one glyph);
    None when the font draws nothing or falls apart into several glyphs."""
    font = ImageFont.truetype(str(EMOJI_FONT), 109)
    canvas = Image.new("RGBA", (420, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((210, 80), char, font=font, embedded_color=True, anchor="mm")
    box = canvas.getbbox()
    if box is None or box[2] - box[0] > 160:
        return None
    return canvas.crop(box).resize((size, size), Image.BICUBIC)


def _render_style(args):
    concept, style, source, size = args
    if style == "noto":
        return concept, style, _render_noto(concept, size)
    if source is None:
        return concept, style, None
    if str(source).endswith(".svg"):
        import cairosvg
        png = cairosvg.svg2png(url=str(source), output_width=size, output_height=size)
        image = Image.open(io.BytesIO(png))
    else:
        image = Image.open(source).resize((size, size), Image.BICUBIC)
    image.load()
    return concept, style, image


def style_sources(concepts: dict[str, str], cache: Path) -> dict[tuple[str, str], Path | None]:
    """(concept, style) -> artwork file, for Twemoji (by code points) and the three Fluent styles
    (by the CLDR English name; skin-toned bases use their `-default` drawing)."""
    twitter = npm_package(*NPM_ARTWORK["twemoji"], cache)
    by_codepoints = {}
    for entry in json.loads((twitter / "emoji.json").read_text()):
        key = "".join(chr(int(h, 16)) for h in entry["unified"].split("-") if h.upper() != "FE0F")
        by_codepoints[key] = twitter / "img" / "twitter" / "64" / entry["image"]
    fluent = npm_package(*NPM_ARTWORK["fluent"], cache) / "icons"
    sources = {}
    for concept, name in concepts.items():
        sources[(concept, "twemoji")] = by_codepoints.get(concept)
        for style, folder in FLUENT_FOLDERS.items():
            hits = [fluent / folder / f"{stem}.svg" for stem in (fluent_slug(name), fluent_slug(name) + "-default")]
            sources[(concept, style)] = next((h for h in hits if h.exists()), None)
    return {k: v for k, v in sources.items() if v is None or v.exists()}


def style_samples(size: int, test_fraction: float, seed: int, cache: Path) -> dict[str, list[dict]]:
    """The multi-style emoji benchmark (see data_shards/README.md):
    - train: train concepts in every style but Twemoji, English name + CLDR keywords;
    - test-style: train concepts drawn by Twemoji (never seen in training), names in 28 languages;
    - test-language: train concepts in the Noto drawings seen in training, names in 28 languages;
    - test-concept: held-out concepts (Noto), names in 28 languages."""
    annotations = {lang: cldr_annotations(lang) for lang in LANGUAGES}
    english, keywords = annotations["en"]
    named = {cp: n for cp, n in english.items() if not (set(cp) & SKIN_TONES)}
    sources = style_sources(named, cache)
    concepts = {cp: n for cp, n in named.items() if sources.get((cp, HELD_OUT_STYLE)) is not None}
    jobs = [(cp, style, sources.get((cp, style)), size) for cp in sorted(concepts)
            for style in ["noto", HELD_OUT_STYLE, *FLUENT_FOLDERS]]
    images: dict[tuple[str, str], Image.Image] = {}
    with ProcessPoolExecutor(2) as pool:
        for concept, style, image in pool.map(_render_style, jobs, chunksize=32):
            if image is not None:
                images[(concept, style)] = image
    concepts = {cp: n for cp, n in concepts.items() if (cp, "noto") in images}  # every split needs Noto
    train, test = split_concepts(list(concepts), test_fraction, seed)

    def concept_id(cp: str) -> str:
        return "-".join(f"{ord(c):04x}" for c in cp)

    def sample(cp: str, style: str, languages: list[str], with_keywords: bool) -> dict:
        captions = {}
        for lang in languages:
            name = annotations[lang][0].get(cp)
            if name:
                captions[lang] = [name]
        if with_keywords:
            captions["en"] += [k for k in keywords.get(cp, []) if k != english[cp]]
        return {"key": f"{style}_{concept_id(cp)}", "image": images[(cp, style)],
                "meta": {"captions": captions, "label": concept_id(cp), "style": style}}

    out = {"train": [sample(cp, style, ["en"], True) for cp in train for style in TRAIN_STYLES
                     if (cp, style) in images],
           "test-style": [sample(cp, HELD_OUT_STYLE, LANGUAGES, False) for cp in train],
           "test-language": [sample(cp, "noto", LANGUAGES, False) for cp in train],
           "test-concept": [sample(cp, "noto", LANGUAGES, False) for cp in test]}
    random.Random(seed).shuffle(out["train"])  # styles interleaved across the training shards
    print(f"styles: {len(concepts)} concepts ({len(train)} train, {len(test)} test-concept); "
          + ", ".join(f"{k} {len(v)}" for k, v in out.items()), file=sys.stderr)
    return out


# The long multilingual captions: per image and language L, the concept's CLDR keywords in other
# languages (LONG_GLOSS_KEYWORDS each, starting after L in LANGUAGES and leaving out English) until
# the gloss has LONG_GLOSS_CHARS characters, then its keywords and name in L. Every part names this
# concept, so no two images share a stretch of caption, and the name sits past a 77-token text
# tower's cut.
LONG_GLOSS_CHARS = 400
LONG_GLOSS_KEYWORDS = 4
LONG_TEST_IMAGES = 400
# Six scripts; the long captions are the costliest text of the demo to encode.
LONG_LANGUAGES = ["en", "de", "zh", "ar", "hi", "sw"]


def long_gloss(cp: str, lang: str, annotations: dict) -> str | None:
    names, keywords = annotations[lang]
    if cp not in names:
        return None
    others = [x for x in LANGUAGES[LANGUAGES.index(lang) + 1:] + LANGUAGES[:LANGUAGES.index(lang)] if x != "en"]
    parts = []
    for other in others:
        words = [k for k in annotations[other][1].get(cp, []) if k != annotations[other][0].get(cp)]
        if words:
            parts.append(", ".join(words[:LONG_GLOSS_KEYWORDS]))
        if len("; ".join(parts)) >= LONG_GLOSS_CHARS:
            break
    own = [k for k in keywords.get(cp, []) if k != names[cp]][:LONG_GLOSS_KEYWORDS]
    if len("; ".join(parts)) < LONG_GLOSS_CHARS:  # too few keywords in CLDR for a long caption
        return None
    return "; ".join(parts + ([", ".join(own)] if own else [])) + f" — {names[cp]}"


def shard_members(shard: Path) -> dict[str, dict[str, bytes]]:
    """A committed shard's samples: key -> {extension: bytes}."""
    members: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return members


def long_samples(source: Path, seed: int) -> list[dict]:
    """`styles-long-test`: LONG_TEST_IMAGES images of styles-test-language (the Noto drawings of the
    training concepts), each captioned by its long multilingual gloss in LONG_LANGUAGES."""
    annotations = {lang: cldr_annotations(lang) for lang in LANGUAGES}
    samples = []
    for shard in sorted(source.glob("styles-test-language-*.tar")):
        for key, parts in sorted(shard_members(shard).items()):
            meta = json.loads(parts["json"])
            cp = "".join(chr(int(x, 16)) for x in meta["label"].split("-")).replace("\ufe0f", "")
            captions = {lang: [g] for lang in LONG_LANGUAGES if (g := long_gloss(cp, lang, annotations))}
            if len(captions) == len(LONG_LANGUAGES):
                # own keys: a caption id (key|language|index) names one text across all eval shards
                samples.append({"key": f"long_{key}", "image": parts["jpg"],  # the same JPEG bytes
                                "meta": {"captions": captions, "label": meta["label"], "style": meta["style"]}})
    random.Random(seed).shuffle(samples)
    return sorted(samples[:LONG_TEST_IMAGES], key=lambda s: s["key"])


def tone_samples(source: Path, size: int) -> list[dict]:
    """`styles-tones`: every training concept that takes a skin tone, in all its drawings of the
    training styles: the default drawings of `styles-train` (same JPEG bytes) and Noto's drawing in
    each of the five tones (the benchmark itself keeps only the default). Captions: the concept's
    CLDR names in every language (the class names; the tone is not part of the class). Up to nine
    drawings per concept: CoOp's shots and its in-domain test images."""
    annotations = {lang: cldr_annotations(lang) for lang in LANGUAGES}
    english = annotations["en"][0]
    defaults: dict[str, list[tuple[str, bytes, str]]] = {}
    for shard in sorted(source.glob("styles-train-*.tar")):
        for key, parts in shard_members(shard).items():
            meta = json.loads(parts["json"])
            defaults.setdefault(meta["label"], []).append((key, parts["jpg"], meta["style"]))
    labels = set(defaults)
    jobs = []
    for label in sorted(labels):
        cp = "".join(chr(int(x, 16)) for x in label.split("-"))
        for tone in sorted(SKIN_TONES):
            toned = cp[0] + tone + cp[1:]  # the tone follows the (first) person
            if toned in english:
                jobs.append((label, cp, tone, toned))
    samples = []

    def names(cp: str) -> dict:
        return {lang: [annotations[lang][0][cp]] for lang in LANGUAGES if cp in annotations[lang][0]}
    for label, cp, tone, toned in jobs:
        image = _render_noto(toned, size)
        if image is None:
            continue
        samples.append({"key": f"noto-tone-{ord(tone):x}_{label}", "image": image,
                        "meta": {"captions": names(cp), "label": label, "style": "noto", "tone": f"{ord(tone):x}"}})
    for label, cp in sorted({(label, cp) for label, cp, _, _ in jobs}):
        for key, jpeg, style in sorted(defaults[label]):
            samples.append({"key": key, "image": jpeg, "meta": {"captions": names(cp), "label": label, "style": style}})
    samples.sort(key=lambda s: s["key"])
    print(f"tones: {len({s['meta']['label'] for s in samples})} concepts, {len(samples)} drawings", file=sys.stderr)
    return samples


def _svg_record(path: Path):
    try:
        meta = ET.parse(path).getroot().find(".//{http://web.resource.org/cc/}Work")
        title = (meta.findtext(f"{DC}title") or "").strip() if meta is not None else ""
        desc = (meta.findtext(f"{DC}description") or "").strip() if meta is not None else ""
        keywords = [li.text.strip() for li in meta.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li")
                    if li.text and li.text.strip()] if meta is not None else []
    except ET.ParseError:
        return None
    return title, desc, keywords


def _render_svg(args):
    path, size = args
    import cairosvg
    record = _svg_record(path)
    if record is None or not record[0]:
        return None
    try:
        png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception:  # malformed SVGs are skipped and counted
        return None
    return path, image, record


def clipart_samples(size: int, limit: int, seed: int):
    """All clip art with a real description (long-caption test) plus `limit` others (train)."""
    paths = sorted(CLIPART.rglob("*.svg"))
    results, skipped = [], 0
    with ProcessPoolExecutor(2) as pool:
        for res in pool.map(_render_svg, [(p, size) for p in paths], chunksize=16):
            if res is None:
                skipped += 1
                continue
            results.append(res)
    print(f"clipart: rendered {len(results)}, skipped {skipped}", file=sys.stderr)
    train, long_test = [], []
    random.Random(seed).shuffle(results)
    for path, image, (title, desc, keywords) in results:
        key = "clipart_" + path.relative_to(CLIPART).with_suffix("").as_posix().replace("/", "_").replace(".", "_")
        category = path.parent.name
        caption = f"{title}, {category} clip art" + (f": {', '.join(keywords[:4])}" if keywords else "")
        if len(desc.split()) >= 12:  # a real description: held out as long-caption test data
            long_test.append({"key": key, "image": image,
                              "meta": {"captions": {"en": [f"{title}. {desc}"]}, "label": category}})
        elif len(train) < limit:
            train.append({"key": key, "image": image, "meta": {"captions": {"en": [caption, title]},
                                                               "label": category}})
    key_order = lambda sample: sample["key"]  # noqa: E731
    return sorted(train, key=key_order), sorted(long_test, key=key_order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).parent))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--clipart-limit", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", nargs="+", choices=["emoji", "clipart", "styles", "long", "tones"], default=["emoji", "clipart", "styles"])
    ap.add_argument("--npm-cache", default=str(Path.home() / ".cache" / "proalign" / "npm"),
                    help="where `npm pack` puts the artwork packages")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes_path = out / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    if "emoji" in args.parts:
        emoji = emoji_samples(args.size, 0.3, args.seed)
        sizes.update(write_shards(emoji["train"], str(out / "emoji-train-%03d.tar"), 1000))
        sizes.update(write_shards(emoji["test"], str(out / "emoji-test-%03d.tar"), 1000))
    if "clipart" in args.parts:
        train, long_test = clipart_samples(args.size, args.clipart_limit, args.seed)
        sizes.update(write_shards(train, str(out / "clipart-train-%03d.tar"), 1000))
        sizes.update(write_shards(long_test, str(out / "clipart-long-test-%03d.tar"), 1000))
    if "styles" in args.parts:
        for split, samples in style_samples(args.size, 0.2, args.seed, Path(args.npm_cache)).items():
            sizes.update(write_shards(samples, str(out / f"styles-{split}-%03d.tar"), 1000))
    if "tones" in args.parts:  # the training concepts of the styles shards already in --out
        sizes.update(write_shards(tone_samples(out, args.size), str(out / "styles-tones-%03d.tar"), 1000))
    if "long" in args.parts:  # from the styles shards already in --out
        sizes.update(write_shards(long_samples(out, args.seed), str(out / "styles-long-test-%03d.tar"), 1000))
    sizes_path.write_text(json.dumps(sizes, indent=1) + "\n")
    print(json.dumps(sizes, indent=1))


if __name__ == "__main__":
    main()
