"""Images are sized before they are decoded: a tiny PNG of extreme aspect ratio (gigabytes once
resized for evaluation) is a counted skip wherever images are read, and limits are settings."""
import io
import json
from collections import Counter

import pytest
from PIL import Image


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(600_000, 1), (1, 600_000), (9000, 9000)])
def test_extreme_images_are_refused_before_decoding(size):
    from proalign.data.images import ImageRefusedError, open_rgb
    with pytest.raises(ImageRefusedError, match=f"{size[0]} x {size[1]} pixels, .*data.max_image_"):
        open_rgb(_png(size), "a.png")
    assert open_rgb(_png((64, 48))).size == (64, 48)


def test_an_extreme_image_in_an_eval_shard_is_a_counted_skip(write_shard, tmp_path):
    import torchvision.transforms as T
    from proalign.data.shards import load_image_text
    meta = lambda i: json.dumps({"captions": {"en": [f"cap {i}"]}}).encode()  # noqa: E731
    shard = write_shard(tmp_path / "bomb-000.tar", [("a.png", _png((600_000, 1))), ("a.json", meta(0)),
                                                    ("b.png", _png((32, 32))), ("b.json", meta(1))])
    skips = Counter()
    preprocess = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    images, keys, _ = load_image_text([str(shard)], preprocess, skips=skips)
    assert keys == ["b"] and skips["bad_sample"] == 1


def test_search_skips_an_extreme_image_in_its_folder(trained, tmp_path):
    from proalign.search import build_index
    folder = tmp_path / "images"
    folder.mkdir()
    for i, path in enumerate(sorted(trained["folder"].iterdir())[:2]):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    (folder / "tall.png").write_bytes(_png((1, 450_000)))
    index, counts = build_index(trained["model"], folder, tmp_path / "index.safetensors", progress=False)
    assert sorted(index.paths) == ["0.png", "1.png"]
    assert counts["skipped"] == 1 and "1 x 450000 pixels" in index.skipped["tall.png"]
