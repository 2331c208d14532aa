"""Write image-text webdataset shards: `<key>.jpg` + `<key>.json` ({"captions": {lang: [..]}, ...})."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable

from PIL import Image


def _encode_image(image: Image.Image | bytes, fmt: str = "jpg", quality: int = 80) -> bytes:
    if isinstance(image, bytes):  # already encoded (a JPEG copied from another shard): kept as it is
        return image
    buf = io.BytesIO()
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        image = background
    image.convert("RGB").save(buf, format="JPEG" if fmt == "jpg" else "PNG", quality=quality)
    return buf.getvalue()


def write_shards(samples: Iterable[dict], pattern: str, max_count: int = 1000) -> dict[str, int]:
    """Write samples {"key", "image": PIL.Image, "meta": dict} to shards `pattern % i`.

    Each shard is written to a temporary name and renamed when complete. Returns {shard: count}.
    """
    import webdataset as wds
    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    shard, count, writer, tmp_name = 0, 0, None, None

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            os.replace(tmp_name, pattern % shard)
            sizes[os.path.basename(pattern % shard)] = count
            writer = None

    for sample in samples:
        if writer is not None and count >= max_count:
            close()
            shard, count = shard + 1, 0
        if writer is None:
            tmp_name = pattern % shard + ".tmp"
            writer = wds.TarWriter(tmp_name)
        writer.write({"__key__": sample["key"], "jpg": _encode_image(sample["image"]),
                      "json": json.dumps(sample["meta"], ensure_ascii=False).encode()})
        count += 1
    close()
    return sizes
