"""Base64 PNG <-> 8-bit grayscale arrays: the one image codec (HTTP API, MLflow pyfunc, clients).

Accepted inputs (everything else is a 422 naming the field):
- 8-bit grayscale PNG (mode L), 1-bit (mode 1) and palette PNGs whose colours are all gray;
- 16-bit grayscale PNG (modes I;16 / I), common for radiographs: scaled to 8 bits (v / 257);
- grayscale with alpha (LA) and RGB/RGBA whose three colour channels are identical, i.e. a gray
  image saved in colour: the gray values are kept and alpha is ignored. An RGB image whose
  channels differ is refused rather than silently mixed down, because a colour picture is almost
  certainly not a radiograph.
Sides must be between MIN_SIDE and MAX_SIDE pixels, and width x height at most the caller's pixel
budget. Both are read from the PNG header (IHDR, the first 33 bytes) before anything is inflated,
so a decompression bomb or a tiny, highly compressible 4096^2 PNG costs nothing to refuse.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
from PIL import Image

from cxrcf.errors import CxrcfError

MIN_SIDE = 8
MAX_SIDE = 4096


# what Pillow raises on bytes that are not a sound image (UnidentifiedImageError is an OSError)
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER_BYTES = 33  # signature, IHDR length and type, then width, height, depth, colour type, ...
_HEADER_B64 = 44  # base64 characters that hold HEADER_BYTES


class ImageError(CxrcfError, ValueError):
    """An image that cannot be used; the message is for the client (the API answers 422)."""


class ImageTooLarge(ImageError):
    """An image over a size budget (the API answers 413)."""


def png_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without decoding anything."""
    if len(raw) < HEADER_BYTES or not raw.startswith(PNG_SIGNATURE) or raw[12:16] != b"IHDR":
        raise ImageError("not a PNG image (no PNG signature and IHDR header)")
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def _b64(data: str) -> str:
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise ImageError("data URL must be base64 encoded (data:image/png;base64,...)")
    return data


def peek_size(data: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG from its first characters: cheap enough for the event loop."""
    head = "".join(_b64(data)[:4 * _HEADER_B64].split())[:_HEADER_B64]
    try:
        raw = base64.b64decode(head, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("not valid base64") from None
    return png_size(raw)


def check_size(width: int, height: int, max_pixels: int) -> None:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ImageError(f"{width}x{height} pixels; each side must be {MIN_SIDE}-{MAX_SIDE}")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                            "(serve.max_pixels)")


def decode_png(data: str, max_pixels: int = MAX_SIDE * MAX_SIDE) -> np.ndarray:
    """Base64 (optionally a `data:image/png;base64,` URL) -> uint8 array (H, W)."""
    try:
        raw = base64.b64decode("".join(_b64(data).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("not valid base64") from None
    if not raw:
        raise ImageError("empty image")
    return decode_png_bytes(raw, max_pixels)


def decode_png_bytes(raw: bytes, max_pixels: int = MAX_SIDE * MAX_SIDE) -> np.ndarray:
    """PNG bytes -> uint8 array (H, W); the size is checked from the header before decoding."""
    if not raw.startswith(PNG_SIGNATURE):
        try:
            with Image.open(io.BytesIO(raw)) as img:
                fmt = img.format
        except PIL_ERRORS:
            fmt = None
        if fmt is None:
            raise ImageError("not a readable image (expected a PNG)")
        raise ImageError(f"{fmt} image; expected a PNG")
    check_size(*png_size(raw), max_pixels)
    try:
        img = Image.open(io.BytesIO(raw))
        if img.format != "PNG":
            raise ImageError(f"{img.format or 'unknown'} image; expected a PNG")
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
        wide = np.asarray(img)
        if mode == "I" and (wide.min() < 0 or wide.max() > 65535):
            raise ImageError(f"{mode} pixel values outside 0-65535")
        # v / 257 rounded (65535 = 255 x 257, so no value lies exactly halfway) in 32-bit integers:
        # float64 copies of a 4096^2 image were half a gigabyte
        return ((wide.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
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


