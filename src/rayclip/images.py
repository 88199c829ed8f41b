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

from .errors import DECODE_ERROR, UserError

# Transparent pixels are composited onto this colour before RGB: what a browser shows on a white page.
TRANSPARENT_BACKGROUND = (255, 255, 255)
# Beyond this many pixels an image is refused before it is decoded (a decompression bomb).
DEFAULT_MAX_PIXELS = 2**27
EXIF_ORIENTATION = 0x0112  # the EXIF tag decode_image applies (ImageOps.exif_transpose)


class BadImageError(UserError):
    """The bytes are not an image we can decode safely; the message is the failure reason."""


class ImageTooLargeError(UserError):
    """The image's bytes (an upload, a base64 field, a fetched URL: `what`) are over the size accepted."""

    def __init__(self, what: str, max_bytes: int):
        super().__init__(f"{what} larger than {max_bytes} bytes")


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


def decode_batch(datas: list[bytes], device: str) -> list:
    """Many images' bytes decoded at once, each to a picture or to the exception that refused it.

    Baseline JPEGs in RGB or greyscale with no EXIF rotation go to torchvision's batched JPEG decoder
    on `device` (nvjpeg on a CUDA device) and come back as uint8 CHW RGB tensors there; every other
    image, and every JPEG that decoder refuses, is decoded by decode_image (an RGB PIL image), so
    whatever the device cannot do is done as it always is.
    """
    pictures: list = [None] * len(datas)
    on_device = [i for i, data in enumerate(datas) if _device_decodable(data)]
    for i, picture in zip(on_device, _decode_jpegs([datas[i] for i in on_device], device)):
        pictures[i] = picture
    for i, data in enumerate(datas):
        if pictures[i] is None:
            try:
                pictures[i] = decode_image(data)
            except Exception as exc:  # a bad image is its caller's to count, not the batch's end
                pictures[i] = exc
    return pictures


def _device_decodable(data: bytes) -> bool:
    """Whether torchvision's JPEG decoder gives what decode_image would: a JPEG in RGB (YCbCr) or
    greyscale, no CMYK, with no EXIF rotation to apply (the CUDA decoder applies none); read from the header."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:  # not an image at all: decode_image says why
        return False


def _decode_jpegs(datas: list[bytes], device: str) -> list:
    """uint8 CHW RGB tensors on `device`, None where the decoder failed: all at once, or one by one
    when the batch fails (torchvision returns nothing of a batch with one bad image)."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 calls its image decoders deprecated
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if encoded else []
        except RuntimeError:
            return [_decode_one(one, device) for one in encoded]


def _decode_one(encoded, device: str):
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg([encoded], mode=ImageReadMode.RGB, device=device)[0]
    except RuntimeError:
        return None


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
        raise ImageTooLargeError(field, max_bytes)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{field} is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(field, max_bytes)
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
        raise BadImageError(DECODE_ERROR) from None
