"""Image decoding: any format Pillow reads to a square `(size, size, 3) uint8` RGB array."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from crackjax.errors import ImageError

# Resizing method recorded in the preprocessing key: changing it invalidates cached pixels.
RESIZE_METHOD = "pillow-bilinear-squash"

# Pillow's own decompression-bomb limit (89,478,485 pixels in Pillow 10 to 13); larger
# images are rejected before their pixels are decoded, so memory stays bounded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


# Formats Pillow identifies but cannot decode without outside programs (Ghostscript).
_FORMATS_NEEDING_PROGRAMS = frozenset({"EPS"})


@functools.cache
def image_extensions() -> frozenset[str]:
    """Return the lower-case file extensions whose images Pillow can decode, such as `.jpg`.

    Formats that Pillow only identifies (stub plugins such as HDF5, GRIB and WMF on
    Linux) and formats that need Ghostscript are left out.
    """
    Image.init()
    extensions = set()
    for extension, image_format in Image.registered_extensions().items():
        if image_format not in Image.OPEN or image_format in _FORMATS_NEEDING_PROGRAMS:
            continue
        plugin_class = Image.OPEN[image_format][0]
        if isinstance(plugin_class, type) and issubclass(plugin_class, ImageFile.StubImageFile):
            continue
        extensions.add(extension.lower())
    return frozenset(extensions)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode the image at `path` into a `(size, size, 3) uint8` RGB array.

    EXIF orientation is applied, every mode (16-bit, grayscale, palette, RGBA, CMYK) is
    converted to 8-bit RGB (transparency is composed onto white), and the image is
    resized to a square with bilinear filtering, ignoring its aspect ratio, as the
    ML.NET tutorial does. Raises ImageError naming the file and the reason.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixel_count(path, image)
                if getattr(image, "n_frames", 1) > 1:
                    raise ImageError(path, f"animated image with {image.n_frames} frames; export one frame as JPEG or PNG")
                # JPEG decoders can scale by 1/2, 1/4 or 1/8 while decoding: far faster
                # for large photos and never below twice the target size.
                image.draft("RGB", (size * 2, size * 2))
                image = ImageOps.exif_transpose(image)
                rgb = _to_rgb(image)
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                array = np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(path, f"image too large to decode safely ({error}); downscale it below {MAX_IMAGE_PIXELS:,} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can identify; remove the file or convert it to JPEG or PNG") from None
    except FileNotFoundError:
        raise ImageError(path, "file not found; it was moved or deleted after the folder was scanned, so run again") from None
    except PermissionError:
        raise ImageError(path, "permission denied; make the file readable or remove it") from None
    except MemoryError:
        raise ImageError(path, f"out of memory while decoding; downscale the image below {MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as error:  # noqa: BLE001
        # Pillow's decoders raise OSError, SyntaxError and ValueError for most corrupt
        # files, but EOFError, struct.error, IndexError or TypeError for some. One bad
        # file becomes a rejected file instead of aborting the run.
        raise ImageError(path, f"cannot decode image ({type(error).__name__}: {error}); the file may be truncated or corrupt, so replace or remove it") from None

    if array.shape != (size, size, 3):
        raise ImageError(path, f"decoded to shape {array.shape}, expected {(size, size, 3)}")
    return array


def _check_pixel_count(path: Path, image: Image.Image) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(path, f"image has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            path,
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}; downscale it first",
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composed onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16- and 32-bit grayscale: scale the observed range to 0..255 would change
        # contrast per image, so map the full 16-bit range instead.
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(values / 257.0, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(values, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
