"""Write labelled shards as a torchvision image folder with per-language class-name files:

    python tools/export_imagefolder.py data_shards/styles-test-style-00{0,1}.tar --out runs/twemoji-folder

gives `<out>/images/<label>/<key>.<ext>` and `<out>/classnames/<lang>.txt` (`<label> <name>` lines),
the layout `proalign eval` reads with `format: imagefolder` and `options.classnames`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from proalign.data.shards import IMAGE_EXTS, iter_raw_samples, parse_meta


def export(shards: list[str], out: Path, max_classes: int | None = None) -> int:
    names: dict[str, dict[str, str]] = {}
    for shard in shards:
        for sample in iter_raw_samples(shard):
            meta = parse_meta(sample, shard)
            label = str(meta.get("label", sample["__key__"])).replace("/", "_").replace(" ", "_")
            if max_classes and label not in names and len(names) >= max_classes:
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                continue
            folder = out / "images" / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{sample['__key__']}.{ext}").write_bytes(sample[ext])
            for lang, caps in (meta.get("class_names") or meta["captions"]).items():
                caps = [caps] if isinstance(caps, str) else caps
                if caps:
                    names.setdefault(label, {}).setdefault(lang, caps[0].replace("\n", " "))
    (out / "classnames").mkdir(parents=True, exist_ok=True)
    languages = sorted({lang for by_lang in names.values() for lang in by_lang})
    for lang in languages:
        lines = [f"{label} {by_lang[lang]}" for label, by_lang in sorted(names.items()) if lang in by_lang]
        (out / "classnames" / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-classes", type=int, default=None, help="the first N classes only")
    args = parser.parse_args()
    print(f"{export(args.shards, Path(args.out), args.max_classes)} classes -> {args.out}")


if __name__ == "__main__":
    main()
