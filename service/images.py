"""Safe image decoding (limits checked before decoding) and JPEG thumbnails, with Pillow."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import PayloadTooLarge, UnsupportedMediaType

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "MPO"})
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode (CMYK, P, L, LA, RGBA, I;16, I, F, 1) -> 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        low, high = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            low, high = 0.0, 65535.0
        elif high <= low:
            high = low + 1.0
        scaled = np.clip((arr - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_image(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Bytes -> RGB image with EXIF orientation applied (GIF: the first frame).

    Raises ``PayloadTooLarge`` (413) over ``max_bytes`` or over ``max_pixels`` (read from
    the header, before any pixel is decoded) and ``UnsupportedMediaType`` (415) when the
    bytes are not a complete image in a supported format.
    """
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{name}: {len(data)} bytes, the limit is {max_bytes}")
    if not data:
        raise UnsupportedMediaType(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.format not in ALLOWED_FORMATS:
                raise UnsupportedMediaType(
                    f"{name}: format {img.format} is not supported (JPEG, PNG, WebP, GIF, BMP)")
            width, height = img.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{name}: {width}x{height} = {width * height} pixels, "
                    f"the limit is {max_pixels}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img) or img)
    except (PayloadTooLarge, UnsupportedMediaType):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{name}: decompression bomb refused ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            f"{name}: not an image in a known format (expected JPEG, PNG, WebP, GIF or BMP)"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnsupportedMediaType(f"{name}: image data is truncated or corrupt") from exc


def thumbnail_jpeg(img: Image.Image, size: int = 128, quality: int = 80) -> bytes:
    """A small JPEG (longest side ``size``) of an RGB image, for the web page."""
    thumb = img.copy()
    thumb.thumbnail((size, size))
    out = io.BytesIO()
    thumb.convert("RGB").save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
