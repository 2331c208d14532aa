#!/usr/bin/env python
"""Rebuild the embedded demo shards from Debian packages (re-runnable, deterministic).

Needs: unicode-cldr-core, fonts-noto-color-emoji, openclipart-svg (apt) and cairosvg (pip).
    python data_shards/build.py [--out data_shards] [--size 64] [--parts emoji clipart]
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
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
    ap.add_argument("--parts", nargs="+", choices=["emoji", "clipart"], default=["emoji", "clipart"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    if "emoji" in args.parts:
        emoji = emoji_samples(args.size, 0.3, args.seed)
        sizes.update(write_shards(emoji["train"], str(out / "emoji-train-%03d.tar"), 1000))
        sizes.update(write_shards(emoji["test"], str(out / "emoji-test-%03d.tar"), 1000))
    if "clipart" in args.parts:
        train, long_test = clipart_samples(args.size, args.clipart_limit, args.seed)
        sizes.update(write_shards(train, str(out / "clipart-train-%03d.tar"), 1000))
        sizes.update(write_shards(long_test, str(out / "clipart-long-test-%03d.tar"), 1000))
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    print(json.dumps(sizes, indent=1))


if __name__ == "__main__":
    main()
