"""Base64 PNG <-> 8-bit grayscale arrays, the image codec of the HTTP API.

Accepted inputs (everything else is a 422 naming the field):
- 8-bit grayscale PNG (mode L), 1-bit (mode 1) and palette PNGs whose colours are all gray;
- 16-bit grayscale PNG (modes I;16 / I), common for radiographs: scaled to 8 bits (v / 257);
- grayscale with alpha (LA) and RGB/RGBA whose three colour channels are identical, i.e. a gray
  image saved in colour: the gray values are kept and alpha is ignored. An RGB image whose
  channels differ is refused rather than silently mixed down, because a colour picture is almost
  certainly not a radiograph.
Sides must be between MIN_SIDE and MAX_SIDE pixels.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

MIN_SIDE = 8
MAX_SIDE = 4096


# what Pillow raises on bytes that are not a sound image (UnidentifiedImageError is an OSError)
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageError(ValueError):
    """A request image that cannot be used; the message is for the client."""


def decode_png(data: str) -> np.ndarray:
    """Base64 (optionally a `data:image/png;base64,` URL) -> uint8 array (H, W)."""
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise ImageError("data URL must be base64 encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("not valid base64") from None
    if not raw:
        raise ImageError("empty image")
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format
        width, height = img.size
    except PIL_ERRORS:
        raise ImageError("not a readable image (expected a PNG)") from None
    if fmt != "PNG":
        raise ImageError(f"{fmt or 'unknown'} image; expected a PNG")
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ImageError(f"{width}x{height} pixels; each side must be {MIN_SIDE}-{MAX_SIDE}")
    try:
        img.load()
    except PIL_ERRORS:
        raise ImageError("truncated or corrupt PNG data") from None
    return _to_gray(img)


def _to_gray(img) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(img, dtype=np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise ImageError(f"{mode} pixel values outside 0-65535")
        return np.round(wide / 257.0).astype(np.uint8)
    if mode == "LA":
        return np.asarray(img, dtype=np.uint8)[..., 0].copy()
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img, dtype=np.uint8)[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise ImageError(f"{mode} image with 3 distinct colour channels; send a 1-channel grayscale PNG")
        return rgb[..., 0].copy()
    raise ImageError(f"unsupported PNG mode {mode}; send a 1-channel grayscale PNG")


def encode_png(pixels: np.ndarray) -> str:
    """uint8 (H, W) -> base64 of an 8-bit grayscale PNG."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a uint8 (H, W) array, got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def resize_gray(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bring a model-resolution uint8 image back to the client's (H, W)."""
    if pixels.shape == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


