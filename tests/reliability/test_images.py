"""Decoding of damaged, unusual and oversized image files, built from the real SDNET2018 sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from crackjax.errors import ImageError
from crackjax.images import MAX_IMAGE_PIXELS, load_image
from crackjax.ingest import scan_folder

from reliability_helpers import REPO_ROOT, write_png

SIZE = 256  # the sample's own size, so decoding is compared without resampling


@pytest.fixture
def original(sdnet_images):
    """The first cracked-deck image of the sample, and its decoded RGB pixels."""
    path = sdnet_images["CD"][0]
    with Image.open(path) as image:
        return path, np.asarray(image.convert("RGB"))


def reason_of(path, size=SIZE) -> str:
    with pytest.raises(ImageError) as raised:
        load_image(path, size)
    assert raised.value.path == str(path)
    assert str(path) in str(raised.value)
    return raised.value.reason


def test_zero_byte_file_rejected(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    reason = reason_of(path)
    assert "not an image" in reason


def test_truncated_jpeg_rejected(tmp_path, original):
    source, _ = original
    data = source.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    reason = reason_of(path)
    assert "truncated" in reason
    assert "replace or remove" in reason


def test_random_bytes_named_jpg_rejected(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "not an image Pillow can identify" in reason_of(path)


def test_text_named_png_rejected(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("inspection notes: deck 7001, no cracks seen\n" * 20, encoding="utf-8")
    assert "not an image Pillow can identify" in reason_of(path)


def test_gray_16bit_png_scaled_to_8bit(tmp_path, original):
    source, _ = original
    with Image.open(source) as image:
        gray = np.asarray(image.convert("L"))
    path = tmp_path / "gray16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    with Image.open(path) as written:
        assert written.mode == "I;16"
    decoded = load_image(path, SIZE)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.repeat(gray[:, :, None], 3, axis=2))


def test_rgb_16bit_png_keeps_high_byte(tmp_path, original):
    _, pixels = original
    wide = pixels.astype(">u2") * 257
    path = tmp_path / "rgb16.png"
    write_png(path, SIZE, SIZE, bit_depth=16, color_type=2, rows=(row.tobytes() for row in wide))
    np.testing.assert_array_equal(load_image(path, SIZE), pixels)


def test_gray_8bit_png_becomes_three_channels(tmp_path, original):
    source, _ = original
    with Image.open(source) as image:
        gray = image.convert("L")
    path = tmp_path / "gray.png"
    gray.save(path)
    decoded = load_image(path, SIZE)
    np.testing.assert_array_equal(decoded, np.repeat(np.asarray(gray)[:, :, None], 3, axis=2))


def test_palette_png_expanded(tmp_path, original):
    source, _ = original
    with Image.open(source) as image:
        palette = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    path = tmp_path / "palette.png"
    palette.save(path)
    with Image.open(path) as written:
        assert written.mode == "P"
    np.testing.assert_array_equal(load_image(path, SIZE), np.asarray(palette.convert("RGB")))


def test_rgba_png_composed_on_white(tmp_path, original):
    _, pixels = original
    alpha = np.zeros((SIZE, SIZE, 1), np.uint8)
    alpha[:, : SIZE // 2] = 255  # left half opaque, right half fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([pixels, alpha], axis=2), mode="RGBA").save(path)
    decoded = load_image(path, SIZE)
    np.testing.assert_array_equal(decoded[:, : SIZE // 2], pixels[:, : SIZE // 2])
    assert (decoded[:, SIZE // 2 :] == 255).all()


def test_cmyk_jpeg_converted_to_rgb(tmp_path, original):
    source, pixels = original
    path = tmp_path / "cmyk.jpg"
    with Image.open(source) as image:
        image.convert("CMYK").save(path, quality=95)
    with Image.open(path) as written:
        assert written.mode == "CMYK"
    decoded = load_image(path, SIZE)
    assert decoded.shape == (SIZE, SIZE, 3)
    # JPEG re-encoding is lossy; the colours must still match the original closely.
    assert np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 3.0


def test_exif_rotated_jpeg_is_turned_upright(tmp_path, original):
    source, _ = original
    with Image.open(source) as image:
        image = image.convert("RGB")
        # Orientation 6: the stored pixels must be turned 90 degrees clockwise for display.
        exif = Image.Exif()
        exif[0x0112] = 6
        image.save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
        image.save(tmp_path / "plain.jpg", quality=95)
    plain = load_image(tmp_path / "plain.jpg", SIZE)
    rotated = load_image(tmp_path / "rotated.jpg", SIZE)
    assert not np.array_equal(rotated, plain)
    np.testing.assert_array_equal(rotated, np.rot90(plain, k=-1))


def test_one_pixel_image_fills_input(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (12, 200, 77)).save(path)
    decoded = load_image(path, 224)
    assert decoded.shape == (224, 224, 3)
    assert (decoded == np.array([12, 200, 77], np.uint8)).all()


@pytest.mark.parametrize("side", [9_500, 20_000], ids=["over-limit", "over-twice-limit"])
def test_decompression_bomb_rejected_from_header(tmp_path, sdnet_images, side):
    # 9,500^2 is over Pillow's limit (a warning that crackjax turns into an error);
    # 20,000^2 is over twice the limit, where Pillow itself raises.
    assert side * side > MAX_IMAGE_PIXELS
    folder = tmp_path / "assets" / "CD"
    folder.mkdir(parents=True)
    path = folder / "huge.png"
    os.symlink(sdnet_images["CD"][0], folder / "good.jpg")
    row = bytes((side + 7) // 8)  # 1-bit grayscale: a valid, decodable, all-black image
    write_png(path, side, side, bit_depth=1, color_type=0, rows=(row for _ in range(side)))

    # A child process measures its peak memory: decoding the image as RGB would take
    # side * side * 3 bytes (271 MB for 9,500^2).
    script = f"""
import json, resource
from crackjax.images import load_image
from crackjax.errors import ImageError
from crackjax.ingest import scan_folder
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_image({str(path)!r}, 224)
    reason = None
except ImageError as error:
    reason = error.reason
scan = scan_folder({str(tmp_path / "assets")!r})
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"reason": reason, "rejected": [[item.path, item.reason] for item in scan.rejected], "growth_kib": after - before}}))
"""
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    outcome = json.loads(child.stdout)
    assert outcome["reason"] is not None
    assert "downscale" in outcome["reason"]
    assert len(outcome["rejected"]) == 1
    assert outcome["rejected"][0][0] == "CD/huge.png"
    assert "over the limit" in outcome["rejected"][0][1]
    assert outcome["growth_kib"] < 50 * 1024


def test_scan_accepts_every_decodable_variant(tmp_path, original):
    source, pixels = original
    folder = tmp_path / "assets" / "CD"
    folder.mkdir(parents=True)
    with Image.open(source) as image:
        image.convert("L").save(folder / "gray.png")
        image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
        image.convert("RGBA").save(folder / "rgba.png")
        image.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(Image.open(source).convert("L")).astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "dot.png")
    scan = scan_folder(tmp_path / "assets")
    assert scan.rejected == []
    assert sorted(record.path for record in scan.records) == [
        "CD/cmyk.jpg", "CD/dot.png", "CD/gray.png", "CD/gray16.png", "CD/palette.png", "CD/rgba.png",
    ]
