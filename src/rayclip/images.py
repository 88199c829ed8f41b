"""The one image-decoding path: bytes (an upload, a base64 field, a fetched URL, a stored object)
to an RGB picture as a person sees it, and the one set of errors a bad image raises.

Every caller decodes here: ingest admits an object only if `inspect_image` accepts it, embed and
queries decode with `decode_image`, and the HTTP routes map the errors to one status each
(BadImageError 415, ImageTooLargeError 413, a malformed field such as bad base64 is a plain UserError:
422), whichever route the image came in by.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np

from .errors import UserError

# Transparent pixels are composited onto this colour before RGB: what a browser shows on a white page.
TRANSPARENT_BACKGROUND = (255, 255, 255)
# Beyond this many pixels an image is refused before it is decoded (a decompression bomb).
DEFAULT_MAX_PIXELS = 2**27


class BadImageError(UserError):
    """The bytes are not an image we can decode safely; the message is the failure reason."""


class ImageTooLargeError(UserError):
    """The image's bytes are over the size accepted."""


def decode_image(data: bytes):
    """Bytes → RGB PIL image as a person sees it (raises on undecodable bytes).

    The first frame of an animation; EXIF orientation applied (phone photos upright); transparency
    (alpha, or a palette / tRNS transparent colour) composited onto TRANSPARENT_BACKGROUND;
    16-bit samples scaled to 8 bits instead of clipped; CMYK through Pillow's conversion.
    """
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    img.seek(0)  # animations: the first frame
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit greyscale PNGs open as I;16 or I: convert("L") would clip every value above 255 to white.
        scale = 1 / 257 if img.mode != "F" else 255.0
        pixels = np.asarray(img, dtype=np.float64) * scale
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """(extension, width, height as displayed) of decodable image bytes; BadImageError(reason) otherwise.

    The bytes are decoded exactly as embed and queries will decode them (decode_image), so an
    object that is admitted here can be embedded later.
    """
    fmt, picture = _checked(data, max_pixels)
    width, height = picture.size
    return {"jpeg": "jpg", "tiff": "tiff"}.get(fmt, fmt), width, height


def open_query_image(image: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A query image (bytes, or a file's path) decoded like any stored one; BadImageError names it
    when it cannot be read or decoded."""
    named = "" if isinstance(image, bytes) else f" {image}"
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
    except OSError:
        raise BadImageError(f"cannot read the query image{named}: no such readable file") from None
    try:
        return _checked(data, max_pixels)[1]
    except BadImageError as bad:
        raise BadImageError(f"cannot read the query image{named}: {bad}") from None


def decode_base64(text: str, max_bytes: int, field: str = "image") -> bytes:
    """A base64 image field's bytes: ImageTooLargeError over `max_bytes`, UserError when it is not base64
    (a malformed field, 422); whether the bytes are an image is decided when they are decoded (415)."""
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise ImageTooLargeError(f"{field} larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{field} is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{field} larger than {max_bytes} bytes")
    return data


def _checked(data: bytes, max_pixels: int):
    """(format, decoded picture), refusing an empty body and a decompression bomb before decoding."""
    from PIL import Image

    if not data:
        raise BadImageError("empty body")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise BadImageError("image too large to decode")
            fmt = (img.format or "").lower()
        return fmt, decode_image(data)  # a truncated or corrupt body fails here, not in embed
    except BadImageError:
        raise
    except Image.DecompressionBombError:
        raise BadImageError("image too large to decode") from None
    except Exception:  # PIL raises many types for undecodable bytes; all mean the same to us
        raise BadImageError("decode error") from None
