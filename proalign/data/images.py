"""Opening images with their size checked before any pixel is decoded.

Pillow's own decompression-bomb guard counts pixels only; an extreme aspect ratio far below it
(a 661-byte 600000 x 1 PNG) becomes gigabytes once evaluation resizes its shorter side to the
tower's size. Every image proalign decodes (shards, dataset files, search folders, `encode_image`
paths) goes through `open_rgb`; a refused image is the caller's counted `bad_image` skip.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

from ..errors import ProalignError


class ImageRefusedError(ProalignError, ValueError):
    """An image whose size is over the configured limits; says which limit."""


@dataclass
class ImageLimits:
    max_pixels: int = 64_000_000
    max_aspect: float = 20.0


# The limits in force in this process: the run config's `data.max_image_pixels` and
# `data.max_image_aspect` (`configure`), else these defaults.
LIMITS = ImageLimits()


def configure(max_pixels: int, max_aspect: float) -> None:
    LIMITS.max_pixels, LIMITS.max_aspect = int(max_pixels), float(max_aspect)


def check_size(image: Image.Image, where: str = "image") -> Image.Image:
    """`image` (opened, not yet decoded) if its size is within LIMITS, else ImageRefusedError."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRefusedError(f"{where}: empty image ({width} x {height})")
    if width * height > LIMITS.max_pixels:
        raise ImageRefusedError(f"{where}: {width} x {height} pixels, over data.max_image_pixels "
                                f"({LIMITS.max_pixels:,})")
    if max(width, height) / min(width, height) > LIMITS.max_aspect:
        raise ImageRefusedError(f"{where}: {width} x {height} pixels, an aspect ratio over data.max_image_aspect "
                                f"({LIMITS.max_aspect:g}:1)")
    return image


def open_rgb(source: Union[str, Path, bytes], where: str = "") -> Image.Image:
    """The image at a path or in bytes, size-checked before decoding, as RGB."""
    handle = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    with handle:
        check_size(handle, where or (str(source) if not isinstance(source, (bytes, bytearray)) else "image"))
        handle.load()
        return handle.convert("RGB")
