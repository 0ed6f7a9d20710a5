"""`ImageListDataset`: a list of `Datum` -> (transformed image, label), read through fsspec.

Every image is decoded fully on access (so a truncated file fails here, not later) and converted
to RGB whatever its mode (L, LA, P, RGBA, CMYK, I;16, ...), as Dassl's `read_image` does with
`convert("RGB")`; 16-bit and float greyscale are scaled to 8 bits first. A missing, unreadable or
corrupt image raises `ImageReadError` (an OSError) naming the file.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from perl_core.data import storage


class ImageReadError(OSError):
    """An image file is missing, unreadable or not a decodable image."""


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` in RGB mode."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
    return img.convert("RGB")


def load_image(impath: str, **storage_options: Any) -> Image.Image:
    """The RGB image at `impath` (local path or URL)."""
    try:
        with storage.open_binary(impath, **storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {impath}") from None
    except OSError as e:
        raise ImageReadError(f"cannot read image {impath}: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise ImageReadError(f"corrupt or unsupported image {impath}: {e}") from None


class ImageListDataset(Dataset):
    """Map-style dataset over `items` (Datum-like: `.impath`, `.label`) -> (image, label).

    `transform` (e.g. `eval_transform(224)`) is applied to the RGB PIL image; None returns it as is.
    `storage_options` are passed to fsspec for URLs (defaults: the environment, see storage.py).
    """

    def __init__(self, items: Sequence[Any], transform: Callable | None = None,
                 storage_options: dict | None = None):
        self.items = list(items)
        self.transform = transform
        self.storage_options = dict(storage_options or {})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        img = load_image(item.impath, **self.storage_options)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(item.label)


__all__ = ["ImageListDataset", "ImageReadError", "load_image", "to_rgb"]
