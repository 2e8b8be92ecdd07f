"""Image decoding: real photographs and generated edge cases, limits before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import PayloadTooLarge, UnsupportedMediaType
from service.images import decode_image, thumbnail_jpeg


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_real_photo_in_every_format(photos, encode, fmt):
    img = decode_image(encode(photos["coffee"], fmt))
    assert img.mode == "RGB" and img.size == photos["coffee"].size


def test_cmyk_jpeg(photos, encode):
    data = encode(photos["astronaut"].convert("CMYK"), "JPEG")
    img = decode_image(data)
    assert img.mode == "RGB"
    diff = np.abs(np.asarray(img, np.int16) - np.asarray(photos["astronaut"], np.int16))
    assert diff.mean() < 20


def test_palette_with_transparency(encode):
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 20, 30))
    img = decode_image(encode(pal, "PNG", transparency=0))
    assert img.mode == "RGB"
    assert img.getpixel((30, 10)) == (255, 255, 255)  # transparent -> white
    assert img.getpixel((5, 10)) == (0, 255, 0)


def test_16_bit_grayscale_png(encode):
    ramp = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 32).astype(np.uint16)
    img = decode_image(encode(Image.fromarray(ramp), "PNG"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr[0, 0, 0] == 0 and arr[-1, -1, 0] > 200


def test_la_image(encode):
    la = Image.new("LA", (10, 10), (100, 255))
    assert decode_image(encode(la, "PNG")).getpixel((0, 0)) == (100, 100, 100)


def test_animated_gif_gives_first_frame(encode):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    img = decode_image(buf.getvalue())
    r, _, b = img.getpixel((8, 8))  # type: ignore[misc]
    assert r > 200 and b < 50


def test_exif_orientation_is_applied(encode):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (20, 40)


def test_truncated_jpeg_is_415(photos, encode):
    data = encode(photos["rocket"], "JPEG")
    with pytest.raises(UnsupportedMediaType):
        decode_image(data[: len(data) // 2])


def test_text_named_jpg_is_415():
    with pytest.raises(UnsupportedMediaType, match=r"cat\.jpg"):
        decode_image(b"this is not an image, just some text\n" * 10, name="cat.jpg")


def test_empty_and_unsupported_format_are_415(encode):
    with pytest.raises(UnsupportedMediaType):
        decode_image(b"")
    with pytest.raises(UnsupportedMediaType, match="TIFF"):
        decode_image(encode(Image.new("RGB", (8, 8)), "TIFF"))


def test_decompression_bomb_is_413_before_decoding(encode):
    bomb = encode(Image.new("1", (12000, 12000)), "PNG")  # ~20 kB, 144 M pixels
    assert len(bomb) < 100_000
    with pytest.raises(PayloadTooLarge, match=r"pixels|bomb"):
        decode_image(bomb)
    small_limit = encode(Image.new("RGB", (200, 200)), "PNG")
    with pytest.raises(PayloadTooLarge, match="40000 pixels"):
        decode_image(small_limit, max_pixels=39_999)


def test_oversized_bytes_is_413(encode):
    data = encode(Image.new("RGB", (64, 64)), "BMP")
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image(data, max_bytes=len(data) - 1)
    assert decode_image(data, max_bytes=len(data)).size == (64, 64)


def test_thumbnail_is_small_jpeg(photos):
    data = thumbnail_jpeg(photos["astronaut"], 64)
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG" and max(thumb.size) == 64 and len(data) < 10_000
